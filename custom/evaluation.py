"""Evaluation of generated follow-ups against honest baselines, in regions that measure the disease.

Regions (docs/README.md, "Measuring the prediction"):

- ``lungs``: the undilated lung labels of the initial scan, where the disease is: the primary score;
- ``change``: the disease-change region: new lesion voxels (follow-up lesions that were not lesions
  at baseline) where the data provide lesion masks (the synthetic cohort's ``new_lesions``), else
  lung voxels where the real scans differ by more than a threshold;
- ``region``: the dilated lung region the model predicts (lungs + 10 mm), mostly chest wall and
  mediastinum whose motion between scans is not affine: reported, not steered by.

Methods scored beside the model: ``identity`` (follow-up := initial scan), ``smoothed`` (the initial
scan Gaussian-smoothed, sigma 1 voxel: a denoiser that knows nothing of the disease) and, where
the cohort renders it, ``oracle`` (the true follow-up anatomy without motion or noise: the ceiling).
Every method gets its paired difference to identity with a 95 % confidence interval (Student t
over cases).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from scipy import stats

from custom.geometry import gaussian_smooth
from custom.io import atomic_write_bytes, check_output_dir, write_json
from custom.metrics import masked_psnr, masked_ssim

logger = logging.getLogger(__name__)

REGIONS = ("lungs", "change", "region")
METRICS = tuple(f"{m}_{r}" for r in REGIONS for m in ("psnr", "ssim"))
REFERENCES = ("identity", "smoothed", "oracle")
SMOOTHING_SIGMA = 1.0
"""Voxels; the smoothed-initial baseline."""


def change_region(initial: torch.Tensor, followup: torch.Tensor, lungs: torch.Tensor, threshold: float,
                  new_lesions: torch.Tensor | None = None) -> torch.Tensor:
    """The disease-change region: the new lesions when known, else lung voxels whose intensity changed.

    Args:
        initial: initial scan y0 in [0, 1].
        followup: real follow-up x0 on the same grid.
        lungs: lung labels or mask (undilated).
        threshold: absolute intensity difference on the [0, 1] scale (0.05 is 60 HU with the
            default window), used when ``new_lesions`` is ``None``.
        new_lesions: new lesion voxels on the grid (follow-up lesions absent at baseline).
    """
    if new_lesions is not None:
        return new_lesions > 0
    return ((followup - initial).abs() > threshold) & (lungs > 0)


def smoothed(initial: torch.Tensor, region: torch.Tensor, sigma: float = SMOOTHING_SIGMA) -> torch.Tensor:
    """The smoothed-initial baseline: y0 Gaussian-filtered, kept inside the region like a prediction.

    Args:
        initial: initial scan (1, D, H, W).
        region: the dilated lung region.
        sigma: Gaussian standard deviation in voxels.
    """
    return gaussian_smooth(np.asarray(initial, dtype=np.float32), sigma) * torch.as_tensor(region > 0)


def region_metrics(
    prediction: torch.Tensor, followup: torch.Tensor, regions: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """PSNR and SSIM of ``prediction`` against the real follow-up in each region; NaN where a region is empty.

    Args:
        prediction: a follow-up (1, D, H, W).
        followup: the real follow-up.
        regions: region name -> boolean mask on the same grid.
    """
    out: dict[str, float] = {}
    for name, mask in regions.items():
        out[f"psnr_{name}"] = out[f"ssim_{name}"] = math.nan
        if not bool(mask.any()):
            continue
        out[f"psnr_{name}"] = float(masked_psnr(prediction, followup, mask))
        try:
            out[f"ssim_{name}"] = float(masked_ssim(prediction, followup, mask))
        except ValueError:  # the region lies entirely within half an SSIM window of the border
            pass
    return out


def case_rows(prediction: torch.Tensor, item: Mapping, threshold: float, keys: Mapping[str, str] | None = None) -> dict:
    """Every method's metrics for one case: the model, identity, smoothed initial and (when given) the oracle.

    Args:
        prediction: the model's follow-up (1, D, H, W) in [0, 1].
        item: the case: ``image`` (y0), ``target`` (x0), ``mask`` (region), ``lungs`` and optionally
            ``new_lesions`` and ``oracle`` (names mapped by ``keys``), and ``patient``.
        threshold: change threshold when the case has no lesion masks.
        keys: names of the entries in ``item`` when they differ from the above.
    """
    k = {"image": "image", "target": "target", "mask": "mask", "lungs": "lungs", "new_lesions": "new_lesions",
         "oracle": "oracle", "patient": "patient", **(keys or {})}

    def get(name: str) -> torch.Tensor | None:
        value = item.get(k[name])
        if value is None:
            return None
        return torch.as_tensor(np.asarray(value), dtype=torch.float32).reshape(1, *np.shape(value)[-3:])

    y0, x0, region, lungs = get("image"), get("target"), get("mask") > 0, get("lungs") > 0
    regions = {"lungs": lungs, "change": change_region(y0, x0, lungs, threshold, get("new_lesions")), "region": region}
    predictions = {"model": torch.as_tensor(np.asarray(prediction), dtype=torch.float32).reshape(y0.shape),
                   "identity": y0, "smoothed": smoothed(y0, region)}
    if get("oracle") is not None:
        predictions["oracle"] = get("oracle")
    row: dict = {"patient": str(item.get(k["patient"], "case")), "change_voxels": int(regions["change"].sum()),
                 "change_source": "new lesions" if get("new_lesions") is not None else f"|x0 - y0| > {threshold}"}
    for method, values in predictions.items():
        row.update({f"{method}_{m}": v for m, v in region_metrics(values, x0, regions).items()})
    return row


def paired_difference(values: np.ndarray, baseline: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Mean paired difference (values - baseline) over cases with a Student-t confidence interval.

    Args:
        values: per-case metric of a method.
        baseline: the same cases' metric of the baseline.
        confidence: coverage of the interval.
    """
    diff = np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float)
    diff = diff[~np.isnan(diff)]
    if diff.size == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = float(diff.mean())
    if diff.size < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": 1}
    half = float(stats.t.ppf(0.5 + confidence / 2, diff.size - 1) * diff.std(ddof=1) / math.sqrt(diff.size))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(diff.size)}


def format_difference(d: Mapping[str, float]) -> str:
    """A ``paired_difference`` as table text: ``+m [+low, +high]``, the mean alone for one case, ``-`` for none.

    Args:
        d: output of ``paired_difference``.
    """
    if not d["n"]:
        return "-"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d["n"] > 1 else f"{d['mean']:+.3f}"


def summarize(rows: list[dict], methods: tuple[str, ...] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, SD and count of every metric for every method (NaNs ignored), and the paired difference to identity.

    Args:
        rows: per-case rows with keys ``<method>_<metric>`` (``case_rows``).
        methods: method prefixes to summarise; ``None`` takes every method present in the rows.
    """
    if methods is None:
        methods = tuple(m for m in ("model", *REFERENCES) if f"{m}_{METRICS[0]}" in rows[0])
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        summary[method] = {}
        for metric in METRICS:
            values = np.array([r[f"{method}_{metric}"] for r in rows], dtype=float)
            kept = values[~np.isnan(values)]
            summary[method][metric] = {
                "mean": float(kept.mean()) if kept.size else math.nan,
                "std": float(kept.std(ddof=1)) if kept.size > 1 else 0.0 if kept.size else math.nan,
                "n": int(kept.size),
                "vs_identity": paired_difference(
                    values, np.array([r[f"identity_{metric}"] for r in rows], dtype=float)
                ),
            }
    return summary


TABLE_COLUMNS = ("psnr_lungs", "ssim_lungs", "psnr_change", "psnr_region", "ssim_region")


def summary_markdown(summary: dict, title: str) -> str:
    """The summary as a Markdown table: mean ± SD per method and metric, and each method's paired gain over identity.

    Args:
        summary: output of ``summarize``.
        title: heading of the table.
    """
    def cell(m: dict) -> str:
        return f"{m['mean']:.3f} ± {m['std']:.3f}" if m["n"] else "-"

    n = max(m["n"] for method in summary.values() for m in method.values())
    lines = [f"### {title}", "",
             f"{n} cases; mean ± SD over cases; gain = paired difference to identity with its 95 % CI.", "",
             "| method | " + " | ".join(TABLE_COLUMNS) + " | gain psnr_lungs | gain ssim_lungs | gain psnr_change |",
             "|---" * (len(TABLE_COLUMNS) + 4) + "|"]
    for method, metrics in summary.items():
        cells = [cell(metrics[c]) for c in TABLE_COLUMNS]
        gains = [format_difference(metrics[c]["vs_identity"]) for c in ("psnr_lungs", "ssim_lungs", "psnr_change")]
        lines.append(f"| {method} | " + " | ".join(cells + gains) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], output_dir: str | os.PathLike, title: str, extra: Mapping | None = None) -> dict:
    """Write ``metrics.csv`` (one row per case), ``summary.json`` and ``summary.md``, each atomically.

    Args:
        rows: per-case rows (``case_rows``).
        output_dir: destination folder.
        title: heading of the Markdown table.
        extra: further entries of ``summary.json``.
    """
    if not rows:
        raise RuntimeError("no case was evaluated: is the test split empty?")
    out = Path(output_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "metrics.csv", buffer.getvalue().encode("utf-8"))
    summary = summarize(rows)
    atomic_write_bytes(out / "summary.md", summary_markdown(summary, title).encode("utf-8"))
    summary.update({"cases": len(rows), **(extra or {})})
    write_json(out / "summary.json", summary)
    return summary


class CaseReport(ABC):
    """Ignite handler base: one row per evaluated case, collected over a run and written when it completes.

    A subclass says what a row is (``row``) and what the run writes (``write``). Under
    ``torch.distributed`` (``configs/multi_gpu_evaluate.json``: each process evaluates the cases a
    ``DistributedSampler`` without shuffling gives it, every ``world_size``-th one) the rows of all
    processes are gathered at the end in the dataset's order, so the report is the one a single
    process writes, and only rank 0 writes it.
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def collect(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            self.rows.append(self.row(item, out))

    def _complete(self, engine: Engine) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.write(engine)
            return
        shards: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(shards, self.rows)
        # rank r held cases r, r + W, r + 2W, ...: interleaving the shards restores the dataset's order
        self.rows = [shards[i % len(shards)][i // len(shards)] for i in range(sum(map(len, shards)))]
        if dist.get_rank() == 0:
            self.write(engine)

    @abstractmethod
    def row(self, item: Mapping, output: Mapping) -> dict:
        """The row of one case.

        Args:
            item: the case's batch entry (images, labels, patient).
            output: the engine's output for it (``"pred"``).
        """

    @abstractmethod
    def write(self, engine: Engine) -> dict:
        """Write the report of the collected rows and return its summary.

        Args:
            engine: the evaluator that completed.
        """


class FollowupMetricsWriter(CaseReport):
    """Ignite handler: per-case metrics of the model and the reference rows, then CSV and summary.

    Reads, for each evaluated case, the generated follow-up (``engine.state.output[i]["pred"]``)
    and the case's images from the batch (``case_rows``). At the end it writes ``metrics.csv``,
    ``summary.json`` and ``summary.md`` into ``output_dir`` (``write_report``).

    Args:
        output_dir: folder of the CSV and summary files.
        threshold: change threshold for cases without lesion masks (see ``change_region``).
        name: method name written in the summary title.
    """

    def __init__(self, output_dir: str | os.PathLike, threshold: float = 0.05, name: str = "model") -> None:
        super().__init__()
        self.output_dir = check_output_dir(output_dir)
        self.threshold = threshold
        self.name = name

    def row(self, item: Mapping, output: Mapping) -> dict:
        """The model's and the reference rows' metrics of one case (``case_rows``; arguments as in the base class)."""
        return case_rows(torch.as_tensor(output["pred"]).detach().cpu().float()[:1], item, self.threshold)

    def write(self, engine: Engine) -> dict:
        summary = write_report(self.rows, self.output_dir, f"{self.name} against the reference rows",
                               {"threshold": self.threshold, "method": self.name})
        logger.info(f"wrote per-case metrics and summary of {len(self.rows)} cases to {self.output_dir}")
        return summary
