"""Evaluation regions with known answers, the reference rows, paired differences and the report files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from custom.evaluation import FollowupMetricsWriter, case_rows, change_region, paired_difference, smoothed


def _case(seed: int, grow: bool) -> dict:
    """A 24^3 case: lungs in the centre, a dilated region around them, a lesion that grows by 8^3 voxels."""
    g = torch.Generator().manual_seed(seed)
    initial = 0.2 + 0.05 * torch.rand(1, 24, 24, 24, generator=g)
    followup = initial.clone()
    new_lesions = torch.zeros_like(initial)
    if grow:
        followup[:, 8:16, 8:16, 8:16] += 0.3
        new_lesions[:, 8:16, 8:16, 8:16] = 1
    region = torch.zeros_like(initial)
    region[:, 2:22, 2:22, 2:22] = 1
    lungs = torch.zeros_like(initial)
    lungs[:, 5:19, 5:19, 5:19] = 1
    return {"image": initial, "target": followup, "mask": region, "lungs": lungs, "new_lesions": new_lesions,
            "patient": f"P{seed}"}


def test_change_region_is_the_new_lesions_when_known_else_the_changed_lung_voxels():
    case = _case(1, grow=True)
    known = change_region(case["image"], case["target"], case["lungs"], 0.05, case["new_lesions"])
    assert int(known.sum()) == 8**3
    # a change outside the lungs is not disease: the threshold region stays inside them
    moved = case["target"].clone()
    moved[:, 2:4, 2:4, 2:4] += 0.5
    assert int(change_region(case["image"], moved, case["lungs"], 0.05).sum()) == 8**3


def test_each_region_scores_what_it_contains():
    case = _case(2, grow=True)
    prediction = case["target"].clone()
    prediction[:, 2:4] = 0.0  # wrong only in the rim of the region outside the lungs
    row = case_rows(prediction, case, 0.05)
    assert math.isinf(row["model_psnr_lungs"]) or row["model_psnr_lungs"] > 100
    assert row["model_psnr_change"] > 100 and row["model_psnr_region"] < 30
    # identity misses the growth: 0.3 everywhere in the change region
    assert row["identity_psnr_change"] == pytest.approx(-20 * math.log10(0.3), abs=1e-3)
    expected_lungs = -10 * math.log10(0.3**2 * 8**3 / 14**3)
    assert row["identity_psnr_lungs"] == pytest.approx(expected_lungs, abs=1e-3)
    assert row["change_voxels"] == 8**3 and row["change_source"] == "new lesions"
    assert "oracle_psnr_lungs" not in row
    case["oracle"] = case["target"]
    assert "oracle_psnr_lungs" in case_rows(prediction, case, 0.05)


def test_smoothed_baseline_is_the_blurred_initial_inside_the_region():
    case = _case(3, grow=False)
    out = smoothed(case["image"], case["mask"])
    assert float(out[case["mask"] == 0].abs().max()) == 0.0
    inner = case["image"][:, 8:16, 8:16, 8:16]
    assert float(out[:, 8:16, 8:16, 8:16].std()) < 0.5 * float(inner.std())


def test_paired_difference_and_its_t_interval():
    d = paired_difference(np.array([2.0, 3.0, 4.0]), np.array([1.0, 1.0, 1.0]))
    # differences 1, 2, 3: mean 2, SD 1, t(0.975, 2) = 4.303
    assert d["mean"] == pytest.approx(2.0) and d["n"] == 3
    assert d["high"] - d["mean"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert paired_difference(np.array([math.nan, 2.0]), np.array([1.0, 1.0]))["n"] == 1


def test_writer_produces_csv_and_summary_with_reference_rows(tmp_path):
    batches = []
    for i in range(4):
        case = _case(i, grow=i % 2 == 0)
        batches.append(([case], [{"pred": case["target"]}]))

    def step(engine, batch):
        engine.state.batch, out = batch
        return out

    engine = Engine(step)
    writer = FollowupMetricsWriter(tmp_path, threshold=0.05, name="perfect")
    writer.attach(engine)
    engine.run(batches, max_epochs=1)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", encoding="utf-8")))
    assert [r["patient"] for r in rows] == ["P0", "P1", "P2", "P3"]
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["cases"] == 4 and set(summary) >= {"model", "identity", "smoothed"}
    assert summary["model"]["psnr_change"]["n"] == 2  # the stable patients have no new lesions
    gain = summary["smoothed"]["ssim_lungs"]["vs_identity"]
    assert gain["n"] == 4 and gain["low"] <= gain["mean"] <= gain["high"]
    text = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "perfect against the reference rows" in text and "| identity |" in text and "| smoothed |" in text
