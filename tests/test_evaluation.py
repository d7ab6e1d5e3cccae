"""Per-case evaluation: the identity baseline, the change region, CSV and summary files."""

from __future__ import annotations

import csv
import json
import math

import torch
from ignite.engine import Engine

from custom.evaluation import FollowupMetricsWriter, case_metrics, change_region


def _case(seed: int, grow: bool):
    g = torch.Generator().manual_seed(seed)
    initial = 0.2 + 0.05 * torch.rand(1, 24, 24, 24, generator=g)
    followup = initial.clone()
    if grow:
        followup[:, 8:16, 8:16, 8:16] += 0.3
    mask = torch.zeros_like(initial)
    mask[:, 2:22, 2:22, 2:22] = 1
    return initial, followup, mask


def test_identity_is_perfect_outside_change_and_undefined_for_stable_change_region():
    initial, followup, mask = _case(0, grow=False)
    m = case_metrics(initial, initial, followup, mask, threshold=0.05)
    assert m["change_voxels"] == 0 and math.isnan(m["psnr_change"])
    assert m["psnr_lung"] > 100 and abs(m["ssim_lung"] - 1) < 1e-6


def test_a_prediction_of_the_change_beats_the_identity():
    initial, followup, mask = _case(1, grow=True)
    assert int(change_region(initial, followup, mask, 0.05).sum()) == 8**3
    good = followup + 0.01
    ident = case_metrics(initial, initial, followup, mask, 0.05)
    model = case_metrics(good, initial, followup, mask, 0.05)
    assert model["psnr_change"] > ident["psnr_change"] + 20
    assert model["ssim_lung"] > ident["ssim_lung"]


def test_writer_produces_csv_and_summary(tmp_path):
    cases = [_case(i, grow=i % 2 == 0) for i in range(4)]
    batches = []
    for i, (initial, followup, mask) in enumerate(cases):
        item = {"image": initial, "target": followup, "mask": mask, "patient": f"P{i}"}
        batches.append(([item], [{"pred": followup}]))

    def step(engine, batch):
        engine.state.batch, out = batch
        return out

    engine = Engine(step)
    writer = FollowupMetricsWriter(tmp_path, threshold=0.05, name="oracle")
    writer.attach(engine)
    engine.run(batches, max_epochs=1)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", encoding="utf-8")))
    assert [r["patient"] for r in rows] == ["P0", "P1", "P2", "P3"]
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["cases"] == 4
    assert summary["model"]["psnr_change"]["n"] == 2
    assert summary["model"]["psnr_lung"]["mean"] > summary["identity"]["psnr_lung"]["mean"]
    assert "oracle vs identity baseline" in (tmp_path / "summary.md").read_text(encoding="utf-8")
