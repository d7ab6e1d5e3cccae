"""Ignite iteration pieces: how a batch of (initial, follow-up) patches becomes a training step.

MONAI's ``SupervisedTrainer`` calls ``prepare_batch(batch)`` to get ``(inputs, targets, args,
kwargs)`` and then ``loss(inferer(inputs, network, *args, **kwargs), targets)``. The classes here
put the forward diffusion process into ``prepare_batch``, so the trainer, a ``SimpleInferer`` and
the loss stay MONAI's own. This is the one training step of the bundle, with one base
(``DiffusionPrepareBatch``) whose hooks a variant overrides:

- conditional DDPM (the paper's "DM" baseline, the base itself): the network sees ``[x_t, y0]``
  and learns what the scheduler's ``prediction_type`` says (the noise by default);
- residual shift (CIResDiff Eq. 2, ResShift, ``ResidualShiftPrepareBatch``): the network sees
  ``[scaled x_t, y0]`` and learns x0.

``WeightedMSELoss`` is the loss when the prepare-batch returns voxel weights with the target;
``GradientNormClipping`` bounds each step between the backward pass and the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.utils import convert_to_tensor

from custom.clinical.encoder import EncodeTexts


def plain_tensor(value: Any, device: torch.device | str | None = None, non_blocking: bool = False) -> torch.Tensor:
    """A batch entry as a plain ``torch.Tensor`` (on ``device`` when given).

    Batches arrive as MONAI ``MetaTensor``s, whose metadata tracking on every operation made a
    training step of the denoiser several times slower (0.5 s -> 3.4 s on 2 CPU cores); neither
    a training step nor the network passes of sampling need metadata.

    Args:
        value: a tensor, ``MetaTensor`` or array.
        device: destination device; ``None`` keeps the tensor where it is.
        non_blocking: asynchronous copy to the device.
    """
    tensor = convert_to_tensor(value, track_meta=False)
    return tensor if device is None else tensor.to(device, non_blocking=non_blocking)


class ConditionalPrepareBatch(PrepareBatch):
    """Shared part of the prepare-batch classes: reading y0, x0, the text context and the interval of a batch.

    Args:
        text_encoder: maps the batch's lung-function texts to token features (B, L, D); ``None``
            trains without clinical conditioning (the paper's DM and DM-R ablations).
        image_key: batch key of the initial scan y0.
        target_key: batch key of the follow-up scan x0.
        text_key: batch key of the lung-function texts.
        weeks_key: batch key of the interval to the follow-up (``custom.data.FollowupIntervald``);
            a batch without it gives the network no interval (its default).
    """

    def __init__(
        self,
        text_encoder: EncodeTexts | None = None,
        image_key: str = "image",
        target_key: str = "target",
        text_key: str = "text",
        weeks_key: str = "weeks",
    ) -> None:
        self.text_encoder = text_encoder
        self.image_key = image_key
        self.target_key = target_key
        self.text_key = text_key
        self.weeks_key = weeks_key

    def images(self, batchdata: dict, device: torch.device | str | None, non_blocking: bool) -> tuple:
        return (plain_tensor(batchdata[self.image_key], device, non_blocking),
                plain_tensor(batchdata[self.target_key], device, non_blocking))

    def context(self, batchdata: dict, device: torch.device | str | None) -> torch.Tensor | None:
        if self.text_encoder is None:
            return None
        if self.text_key not in batchdata:
            raise KeyError(
                f"the batch has no '{self.text_key}' entry: add the lung-function text transform to the preprocessing."
            )
        return self.text_encoder(list(batchdata[self.text_key])).to(device)

    def network_kwargs(self, batchdata: dict, device: torch.device | str | None) -> dict[str, torch.Tensor | None]:
        """The conditioning keywords of the network: the text ``context``, and ``weeks`` (B,) when the batch has it."""
        kwargs = {"context": self.context(batchdata, device)}
        if self.weeks_key in batchdata:
            kwargs["weeks"] = plain_tensor(batchdata[self.weeks_key], device).float().reshape(-1)
        return kwargs


def loss_weight(lungs: torch.Tensor, region: torch.Tensor, outside_lung_weight: float) -> torch.Tensor:
    """Voxel weights of the training loss: 1 in the lungs, ``outside_lung_weight`` in the rest of the region, 0 outside.

    The model is scored in the lungs, where the disease is; the rest of the dilated region is
    chest wall and mediastinum whose motion between scans no model can predict, so it gets a
    small weight (enough to keep the output there close to the conditional mean, not to steer).

    Args:
        lungs: lung labels (B, 1, ...); non-zero inside a lung.
        region: the dilated lung region (B, 1, ...).
        outside_lung_weight: weight of region voxels outside the lungs.
    """
    inside = (lungs > 0).float()
    return inside + outside_lung_weight * ((region > 0).float() - inside).clamp_min(0.0)


class WeightedMSELoss(torch.nn.Module):
    """Voxel-weighted mean squared error for targets that carry their weights as a last channel.

    MONAI's ``SupervisedTrainer`` calls ``loss(prediction, target)``; a prepare-batch that wants a
    masked loss (``DiffusionPrepareBatch`` with ``lungs_key``) returns ``target`` as
    ``[target, weight]`` along the channels, and this loss splits them: sum(w (f - target)^2) / sum(w).
    """

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target, weight = target[:, :-1], target[:, -1:].expand_as(prediction)
        return ((prediction.float() - target.float()) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


class GradientNormClipping:
    """Clip the global L2 norm of the gradients of every optimizer step (attach to a MONAI trainer).

    The guard used in diffusion training since DDPM (Ho et al., NeurIPS 2020, whose released
    training setup clips at 1); the shipped weights of 0.9.0 were trained with it, and its effect on
    this recipe is not measured (the card's "What diverged, and the clipping").

    It runs on MONAI's ``BACKWARD_COMPLETED`` event, after the backward pass and before the step;
    under AMP it unscales the gradients first, so the norm is the true one.

    Args:
        max_norm: the largest global gradient norm; ``None`` or 0 turns clipping off.
    """

    def __init__(self, max_norm: float | None = 1.0) -> None:
        if max_norm is not None and (not isinstance(max_norm, (int, float)) or max_norm < 0):
            raise ValueError(f"max_norm must be a non-negative number or None, got {max_norm!r}")
        self.max_norm = max_norm

    def attach(self, engine: Any) -> None:
        """Clip on every backward pass of ``engine`` (nothing when clipping is off)."""
        if self.max_norm:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)
        engine.state.grad_norm = float(norm)


class DiffusionPrepareBatch(ConditionalPrepareBatch):
    """Training input of a conditional denoiser: ``x_t`` of the forward process at a random step, and its target.

    One base with hooks, as MONAI's ``DiffusionPrepareBatch``: ``get_timesteps``, ``get_noise``,
    ``forward_process``, ``model_input`` and ``get_target``. As it stands it is the conditional
    DDPM baseline (the paper's "DM"): ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al.
    2020) and the target follows the scheduler's ``prediction_type``: the noise (``"epsilon"``),
    x0 (``"sample"``) or the velocity (``"v_prediction"``). It returns inputs ``[x_t, y0]``
    (B, 2, ...), the target and the kwargs ``timesteps``, ``context`` (and ``weeks``) of the network.

    With ``lungs_key`` the target is ``[target, weight]`` along the channels for ``WeightedMSELoss``
    (weights from ``loss_weight``).

    Args:
        scheduler: the scheduler defining the forward process (a MONAI ``DDPMScheduler`` or
            ``DDIMScheduler`` here, the ``ResidualShiftScheduler`` in ``ResidualShiftPrepareBatch``).
        text_encoder: see ``ConditionalPrepareBatch``.
        image_key: batch key of the initial scan y0.
        target_key: batch key of the follow-up scan x0.
        text_key: batch key of the lung-function texts.
        weeks_key: batch key of the interval to the follow-up.
        lungs_key: batch key of the lung labels for a weighted loss; ``None`` returns the target alone.
        region_key: batch key of the dilated lung region (used with ``lungs_key``).
        outside_lung_weight: see ``loss_weight``.
    """

    def __init__(
        self,
        scheduler: torch.nn.Module,
        text_encoder: EncodeTexts | None = None,
        image_key: str = "image",
        target_key: str = "target",
        text_key: str = "text",
        weeks_key: str = "weeks",
        lungs_key: str | None = None,
        region_key: str = "mask",
        outside_lung_weight: float = 0.1,
    ) -> None:
        super().__init__(text_encoder, image_key, target_key, text_key, weeks_key)
        self.scheduler = scheduler
        self.lungs_key, self.region_key = lungs_key, region_key
        self.outside_lung_weight = float(outside_lung_weight)

    def get_timesteps(self, x0: torch.Tensor) -> torch.Tensor:
        """One step per patch, uniform over the scheduler's training steps."""
        return torch.randint(0, self.scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)

    def get_noise(self, x0: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of x0's shape."""
        return torch.randn_like(x0)

    def forward_process(self, x0: torch.Tensor, y0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, timesteps, noise)``: a draw of the forward process at random steps (the steps are drawn first)."""
        timesteps = self.get_timesteps(x0)
        noise = self.get_noise(x0)
        return self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps), timesteps, noise

    def model_input(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network sees of x_t: x_t itself (the DDPM baseline does not scale it)."""
        return x_t

    def get_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network learns to output, as the scheduler's ``prediction_type`` says."""
        prediction_type = getattr(self.scheduler, "prediction_type", "epsilon")
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        if prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        raise ValueError(f"unknown prediction_type {prediction_type!r} of {type(self.scheduler).__name__}.")

    def __call__(
        self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        y0, x0 = self.images(batchdata, device, non_blocking)
        x_t, timesteps, noise = self.forward_process(x0, y0)
        inputs = torch.cat([self.model_input(x_t, timesteps), y0], dim=1)
        target = self.get_target(x0, noise, timesteps)
        if self.lungs_key is not None:
            lungs = plain_tensor(batchdata[self.lungs_key], device, non_blocking)
            region = plain_tensor(batchdata[self.region_key], device, non_blocking)
            target = torch.cat([target, loss_weight(lungs, region, self.outside_lung_weight)], dim=1)
        return inputs, target, (), {"timesteps": timesteps, **self.network_kwargs(batchdata, device)}


class ResidualShiftPrepareBatch(DiffusionPrepareBatch):
    """Training input of the residual-shift denoiser: ``x_t ~ q(x_t | x0, y0)`` at a random step, target x0.

    Inputs ``[scaled x_t, y0]`` and target x0, so that minimising the MSE is the loss
    ``||f(x_t, y0, t, text) - x0||^2`` of CIResDiff Eq. 4.

    A share ``mean_fraction`` of the patches is instead given the prior's mean, x_T = y0 at
    t = T: there the loss trains the conditional-mean predictor (``ResidualShiftInferer.predict_mean``).

    Args:
        scheduler: the ``ResidualShiftScheduler`` that owns the eta schedule.
        mean_fraction: probability that a patch trains the mean predictor instead of a random step.
        kwargs: the batch keys, text encoder and loss weighting of ``DiffusionPrepareBatch``.
    """

    def __init__(self, scheduler: torch.nn.Module, mean_fraction: float = 0.0, **kwargs: Any) -> None:
        super().__init__(scheduler, **kwargs)
        if not 0.0 <= mean_fraction <= 1.0:
            raise ValueError(f"mean_fraction must be in [0, 1], got {mean_fraction}.")
        self.mean_fraction = float(mean_fraction)

    def forward_process(self, x0: torch.Tensor, y0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, timesteps, noise)``: x_t = x0 + eta_t e0 + kappa sqrt(eta_t) noise; y0 at t = T for mean patches."""
        timesteps = self.get_timesteps(x0)
        # no draw when unused, so that a run without mean patches replays the same random stream
        at_mean = (torch.rand(x0.shape[0], device=x0.device) < self.mean_fraction if self.mean_fraction > 0
                   else torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device))
        timesteps = torch.where(at_mean, torch.full_like(timesteps, self.scheduler.num_train_timesteps - 1), timesteps)
        noise = self.get_noise(x0)
        x_t = self.scheduler.add_noise(x0, y0, noise, timesteps)
        return torch.where(at_mean.reshape(-1, *([1] * (x0.ndim - 1))), y0, x_t), timesteps, noise

    def model_input(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t as the scheduler scales it for the network (``ResidualShiftScheduler.scale_model_input``)."""
        return self.scheduler.scale_model_input(x_t, timesteps)

    def get_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0: the residual-shift network predicts the follow-up itself."""
        return x0


class SamplingPrepareBatch(ConditionalPrepareBatch):
    """Evaluation and inference input: y0 for the sampler, x0 as the reference when known, the conditioning.

    Args:
        text_encoder: see ``ConditionalPrepareBatch``.
        image_key: batch key of the initial scan y0.
        target_key: batch key of the follow-up scan x0.
        text_key: batch key of the lung-function texts.
        weeks_key: batch key of the interval to the follow-up.
    """

    def __call__(
        self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        y0 = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking)
        # At inference there is no follow-up to compare with.
        x0 = batchdata.get(self.target_key)
        x0 = None if x0 is None else torch.as_tensor(x0).to(device, non_blocking=non_blocking)
        return y0, x0, (), self.network_kwargs(batchdata, device)
