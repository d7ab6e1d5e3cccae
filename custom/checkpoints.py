"""Checkpoints that survive being killed: atomic writes, resume from the last one, safe loading.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a process killed while saving
can leave a truncated file where the last good checkpoint was. Here every file is written with
``custom.io.atomic_open``: to a temporary name in the same folder, flushed to disk and renamed
over the old one, which POSIX guarantees to be atomic. Every load uses
``torch.load(..., weights_only=True)``: a checkpoint can carry tensors and plain containers, never code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from custom.io import atomic_open, atomic_write_bytes, check_output_dir, write_json

logger = logging.getLogger(__name__)


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a ``DistributedDataParallel`` or ``DataParallel`` wrapper."""
    return module.module if hasattr(module, "module") and isinstance(module.module, torch.nn.Module) else module


def _plain(obj: Any) -> Any:
    return unwrap(obj) if isinstance(obj, torch.nn.Module) else obj


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Save ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one.

    Args:
        obj: what to save (state dicts, tensors, plain containers).
        path: destination file.
    """
    with atomic_open(path) as f:
        torch.save(obj, f)


def save_weights(network: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write a network's weights (its state dict, unwrapped from DDP) atomically.

    Args:
        network: the trained network.
        path: destination file.
    """
    atomic_torch_save(unwrap(network).state_dict(), path)
    return Path(path)


def safe_load(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; a pickled object payload is refused.

    Args:
        path: checkpoint file.
        map_location: device the tensors are loaded to.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError depending on the payload
        raise ValueError(
            f"refusing to load {path}: it is not a plain weights file (weights_only=True failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Only load checkpoints you trust."
        ) from e


def load_network_weights(
    network: torch.nn.Module, path: str | os.PathLike, key: str = "network", new_modules: Sequence[str] = ()
) -> torch.nn.Module:
    """Load weights saved by this bundle into ``network`` with a clear error on a shape mismatch.

    Args:
        network: the network to fill (a DDP wrapper is unwrapped).
        path: a file holding a state dict, or a dict with the state dict under ``key``.
        key: entry of a full training checkpoint that holds the network weights.
        new_modules: submodules the weights may lack (fine-tuning a network that gained them, e.g.
            ``interval_embed``); they keep their initialisation. Every other weight must be there.
    """
    state = safe_load(path)
    if isinstance(state, Mapping) and key in state:
        state = state[key]
    target = unwrap(network)
    if new_modules:
        state = dict(state)
        for name, value in target.state_dict().items():
            if name.split(".")[0] in new_modules and name not in state:
                state[name] = value
    try:
        target.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"the weights in {path} do not fit this network (was it trained with another network "
            f"configuration?): {str(e).splitlines()[0]}"
        ) from e
    return network


def settings_path(model_path: str | os.PathLike) -> Path:
    """The JSON beside a weights file with the inference settings chosen with them (``model.pt``: ``model.json``)."""
    return Path(model_path).with_suffix(".json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_model_settings(model_path: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Write the inference settings chosen on validation with the weights at ``model_path`` (atomic).

    The file names the weights it was made for by their SHA-256, so settings never outlive their
    weights unnoticed (``read_model_settings`` refuses a mismatch).

    Args:
        model_path: the weights file, already written.
        settings: plain JSON values, e.g. ``{"mean_smoothing_sigma": 0.5}``.
    """
    return write_json(settings_path(model_path), {**settings, "weights_sha256": _sha256(Path(model_path))})


def read_model_settings(model_path: str | os.PathLike) -> dict:
    """The inference settings chosen with the weights at ``model_path``; ``{}`` when none were written.

    Args:
        model_path: the weights file.
    """
    path, model_path = settings_path(model_path), Path(model_path)
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}): delete it, or write it again with the weights.") from e
    if not model_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {model_path} (its settings {path} are there)")
    if not isinstance(settings, dict) or settings.get("weights_sha256") != _sha256(model_path):
        raise ValueError(
            f"{path} was written for other weights than {model_path} (SHA-256 differs): delete it (the "
            "mean prediction is then unsmoothed) or give the settings explicitly (e.g. --mean_smoothing_sigma).")
    return settings


def mean_smoothing_sigma(model_path: str | os.PathLike) -> float:
    """The mean prediction's smoothing chosen on validation with these weights; 0 (none) when none was chosen.

    Args:
        model_path: the weights file.
    """
    return float(read_model_settings(model_path).get("mean_smoothing_sigma", 0.0))


def sample_output_step(model_path: str | os.PathLike) -> int:
    """The reverse step whose x0 prediction a sample returns, chosen on validation with these weights; 1 (the
    whole chain) when none was chosen (``custom.inferer.DiffusionSamplingInferer``'s ``sample_output_step``).

    Args:
        model_path: the weights file.
    """
    return int(read_model_settings(model_path).get("sample_output_step", 1))


class ResumableCheckpoint:
    """Save the training state every ``save_interval`` epochs and resume from it when it exists.

    Attach it to the trainer. At start it loads ``<save_dir>/last.pt`` if present, so re-running a
    killed training continues where the last save left it and stops at the same final iteration.
    Only rank 0 writes.

    Args:
        save_dir: folder of ``last.pt``.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, ...); the
            trainer's own state is added under ``trainer``.
        save_interval: epochs between saves.
        map_location: device for loading.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        map_location: str | torch.device | None = "cpu",
    ) -> None:
        if _is_main_process():
            check_output_dir(save_dir)
        self.path = Path(save_dir) / "last.pt"
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.resume)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def resume(self, engine: Engine) -> None:
        if not self.path.is_file():
            return
        state = safe_load(self.path, self.map_location)
        for name, obj in self.save_dict.items():
            _plain(obj).load_state_dict(state[name])
        trainer_state = state["trainer"]
        engine.state.epoch = int(trainer_state["epoch"])
        engine.state.iteration = int(trainer_state["iteration"])
        logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")
        if engine.state.epoch >= engine.state.max_epochs:
            engine.terminate()

    def save(self, engine: Engine) -> None:
        if not _is_main_process():
            return
        state = {name: _plain(obj).state_dict() for name, obj in self.save_dict.items()}
        state["trainer"] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        atomic_torch_save(state, self.path)


class BestModelSaver:
    """Write the network's weights when the evaluator's key metric improves and clears a bar (atomic, rank 0 only).

    Attach it to the validation evaluator. With ``min_score`` (e.g. 0 for the paired lung-PSNR
    gain over identity) a model that does not beat the bar is never written: ``model.pt`` keeps
    what it held, and ``FinalValidation`` says so at the end of training.

    Args:
        network: the network whose weights are saved (a DDP wrapper is unwrapped).
        path: destination file, e.g. ``models/model.pt``.
        metric_name: key of ``engine.state.metrics`` to maximise; ``None`` uses the evaluator's key metric.
        min_score: the score a model must exceed to be written; ``None`` writes every improvement.
        smoothing_metric: key of ``engine.state.metrics`` holding the mean prediction's smoothing chosen
            in the same validation (``custom.metrics.SmoothedGainMetric``), written with the weights
            (``write_model_settings``); ``None``: no settings, and stale ones beside ``path`` are removed.
    """

    def __init__(self, network: torch.nn.Module, path: str | os.PathLike, metric_name: str | None = None,
                 min_score: float | None = None, smoothing_metric: str | None = None) -> None:
        self.network = network
        self.path = Path(path)
        self.metric_name = metric_name
        self.min_score = min_score
        self.smoothing_metric = smoothing_metric
        self.best = -float("inf")
        self.saved = False
        self.last_settings: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict:
        """The best score so far and whether it was written, so that a resumed training keeps both."""
        return {"best": self.best, "saved": self.saved}

    def load_state_dict(self, state: Mapping) -> None:
        self.best = float(state["best"])
        self.saved = bool(state.get("saved", self.best > -float("inf")))

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or engine.state.key_metric_name
        value = float(engine.state.metrics[name])
        if self.smoothing_metric is not None:
            self.last_settings = {"mean_smoothing_sigma": float(engine.state.metrics[self.smoothing_metric]),
                                  name: value}
        if value <= self.best:
            return
        self.best = value
        if self.min_score is not None and value <= self.min_score:
            logger.warning(f"{name} = {value:.4f} does not exceed {self.min_score}: {self.path} not written")
            return
        self.saved = True
        if not _is_main_process():
            return
        atomic_torch_save(unwrap(self.network).state_dict(), self.path)
        if self.smoothing_metric is None:
            settings_path(self.path).unlink(missing_ok=True)
            logger.info(f"saved {self.path} ({name} = {value:.4f})")
            return
        write_model_settings(self.path, self.last_settings)
        logger.info(f"saved {self.path} ({name} = {value:.4f}, mean prediction smoothed by "
                    f"{self.last_settings['mean_smoothing_sigma']:g} voxel)")


class FinalValidation:
    """At the end of training, make sure the final model was validated, and say plainly when none beat the bar.

    A training whose length is not a multiple of its validation interval would otherwise end with
    its last iterations unvalidated (or with no validation at all); this runs the validator once
    more at completion unless it just ran on the final weights, so the ``BestModelSaver`` (and its
    ``min_score`` gate) sees the final model in every run. When
    no validated model cleared the bar, ``model.pt`` is left as it was and an error is logged and
    written to ``report_path``; the settings the final validation chose for the final weights
    (``BestModelSaver.last_settings``) go beside it as JSON, so that whoever still scores those
    weights scores them as validated. Attach it to the trainer.

    Args:
        validator: the validation evaluator (its handlers include ``best_model``).
        best_model: the validation's ``BestModelSaver``.
        report_path: text file that receives the message when no model was written (removed otherwise,
            with its JSON).
    """

    def __init__(self, validator: Engine, best_model: BestModelSaver, report_path: str | os.PathLike) -> None:
        self.validator = validator
        self.best_model = best_model
        self.report_path = Path(report_path)
        self.trainer: Engine | None = None
        self.validated_at: int | None = None

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        self.validator.add_event_handler(Events.COMPLETED, self._mark)
        engine.add_event_handler(Events.COMPLETED, self)

    def _mark(self, _: Engine) -> None:
        self.validated_at = None if self.trainer is None else self.trainer.state.iteration

    def __call__(self, engine: Engine) -> None:
        if self.validated_at != engine.state.iteration:
            self.validator.run()
        settings = self.report_path.with_suffix(".json")
        if self.best_model.saved:
            if _is_main_process():
                self.report_path.unlink(missing_ok=True)
                settings.unlink(missing_ok=True)
            return
        message = (f"no validated model beat the bar ({self.best_model.metric_name or 'key metric'} > "
                   f"{self.best_model.min_score}; best {self.best_model.best:.4f}): "
                   f"{self.best_model.path} was not written")
        logger.error(message)
        if _is_main_process():
            atomic_write_bytes(self.report_path, (message + "\n").encode("utf-8"))
            if self.best_model.last_settings:
                write_json(settings, self.best_model.last_settings)
            else:
                settings.unlink(missing_ok=True)
