"""Evaluation of generated follow-ups: per-case metrics, the identity baseline, CSV and summary.

Two regions are measured (CIResDiff Sec. 3.2 reports PSNR and SSIM; the regions are ours):

- ``lung``: the dilated lung region of the pre-registered pair;
- ``change``: voxels of that region where the real follow-up differs from the initial scan by more
  than a threshold, i.e. where the disease (or residual misalignment) changed the image. This is
  where a model must do better than copying the initial scan.

Every model is compared with the **identity baseline**, which predicts the follow-up to be the
initial scan: a model that does not beat it has learned nothing about progression.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from custom.io import atomic_write_bytes, check_output_dir
from custom.metrics import masked_psnr, masked_ssim

logger = logging.getLogger(__name__)

METRICS = ("psnr_lung", "ssim_lung", "psnr_change", "ssim_change")


def change_region(initial: torch.Tensor, followup: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Voxels inside ``mask`` where the real scans differ by more than ``threshold``.

    Args:
        initial: initial scan y0 in [0, 1].
        followup: real follow-up x0 on the same grid.
        mask: lung region.
        threshold: absolute intensity difference on the [0, 1] scale (0.05 is 60 HU with the
            default window).
    """
    return ((followup - initial).abs() > threshold) & (mask > 0)


def case_metrics(
    prediction: torch.Tensor, initial: torch.Tensor, followup: torch.Tensor, mask: torch.Tensor, threshold: float
) -> dict[str, float]:
    """PSNR and SSIM of ``prediction`` against the real follow-up, in the lung and change regions.

    A case whose change region is empty (a stable patient) gets NaN for the change metrics.

    Args:
        prediction: generated follow-up (1, D, H, W) or (B, 1, D, H, W) with B = 1.
        initial: initial scan on the same grid.
        followup: real follow-up on the same grid.
        mask: lung region.
        threshold: see ``change_region``.
    """
    out = {"psnr_lung": float(masked_psnr(prediction, followup, mask)), "ssim_lung": float(masked_ssim(prediction, followup, mask))}
    changed = change_region(initial, followup, mask, threshold)
    out["change_voxels"] = int(changed.sum())
    if out["change_voxels"] == 0:
        out["psnr_change"] = out["ssim_change"] = math.nan
        return out
    out["psnr_change"] = float(masked_psnr(prediction, followup, changed))
    try:
        out["ssim_change"] = float(masked_ssim(prediction, followup, changed))
    except ValueError:  # the change lies entirely within half an SSIM window of the border
        out["ssim_change"] = math.nan
    return out


def summarize(rows: list[dict], methods: tuple[str, ...] = ("model", "identity")) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, standard deviation and count of every metric for every method, ignoring NaNs.

    Args:
        rows: per-case rows with keys ``<method>_<metric>``.
        methods: method prefixes to summarise.
    """
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        summary[method] = {}
        for metric in METRICS:
            values = np.array([r[f"{method}_{metric}"] for r in rows], dtype=float)
            values = values[~np.isnan(values)]
            summary[method][metric] = {
                "mean": float(values.mean()) if values.size else math.nan,
                "std": float(values.std(ddof=1)) if values.size > 1 else 0.0 if values.size else math.nan,
                "n": int(values.size),
            }
    return summary


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def summary_markdown(summary: dict, title: str) -> str:
    """The summary as a Markdown table: one row per method, mean +/- std per metric.

    Args:
        summary: output of ``summarize``.
        title: heading of the table.
    """
    lines = [f"### {title}", "", "| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for method, metrics in summary.items():
        cells = [f"{m['mean']:.3f} ± {m['std']:.3f} (n={m['n']})" for m in metrics.values()]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class FollowupMetricsWriter:
    """Ignite handler: per-case metrics of the model and of the identity baseline, then CSV and summary.

    Reads, for each evaluated case, the generated follow-up (``engine.state.output[i]["pred"]``),
    the initial scan, the real follow-up, the lung mask and the patient id from the batch. At the
    end it writes ``metrics.csv`` (one row per case) and ``summary.json`` / ``summary.md`` (mean
    +/- std) into ``output_dir``, each file atomically.

    Args:
        output_dir: folder of the CSV and summary files.
        threshold: intensity difference defining the change region (see ``change_region``).
        name: method name written in the summary title.
        image_key: batch key of the initial scan.
        target_key: batch key of the real follow-up.
        mask_key: batch key of the lung region.
        id_key: batch key of the patient id.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        threshold: float = 0.05,
        name: str = "model",
        image_key: str = "image",
        target_key: str = "target",
        mask_key: str = "mask",
        id_key: str = "patient",
    ) -> None:
        self.output_dir = check_output_dir(output_dir)
        self.threshold = threshold
        self.name = name
        self.keys = (image_key, target_key, mask_key, id_key)
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        image_key, target_key, mask_key, id_key = self.keys
        batch, output = engine.state.batch, engine.state.output
        for item, out in zip(batch, output):
            y0, x0, mask = (torch.as_tensor(item[k]).cpu().float() for k in (image_key, target_key, mask_key))
            pred = torch.as_tensor(out["pred"]).cpu().float()
            row: dict = {"patient": item.get(id_key, f"case{len(self.rows)}")}
            model = case_metrics(pred, y0, x0, mask, self.threshold)
            identity = case_metrics(y0, y0, x0, mask, self.threshold)
            row["change_voxels"] = model.pop("change_voxels")
            identity.pop("change_voxels")
            row.update({f"model_{k}": v for k, v in model.items()})
            row.update({f"identity_{k}": v for k, v in identity.items()})
            self.rows.append(row)

    def write(self, engine: Engine) -> dict:
        if not self.rows:
            raise RuntimeError("no case was evaluated: is the test split empty?")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        _atomic_write_text(self.output_dir / "metrics.csv", buffer.getvalue())
        summary = summarize(self.rows)
        summary["threshold"] = self.threshold
        summary["cases"] = len(self.rows)
        _atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))
        tables = {k: v for k, v in summary.items() if k in ("model", "identity")}
        _atomic_write_text(self.output_dir / "summary.md", summary_markdown(tables, f"{self.name} vs identity baseline"))
        logger.info(f"wrote per-case metrics and summary of {len(self.rows)} cases to {self.output_dir}")
        return summary
