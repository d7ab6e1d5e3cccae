"""scripts/compare_runs.py: paired differences of two evaluations, on runs with known answers."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from custom.progression import laplace_log_likelihood
from scripts.compare_runs import compare_metrics, compare_progression, main, report


def _metrics_rows(model: list[float], identity: list[float]) -> list[dict]:
    return [{"patient": f"P{i}", "model_psnr_lungs": str(m), "model_ssim_lungs": "0.8",
             "identity_psnr_lungs": str(d)} for i, (m, d) in enumerate(zip(model, identity))]


def _write_metrics(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_metric_differences_are_paired_over_shared_patients():
    identity = [20.0, 21.0, 22.0, 23.0]
    a = _metrics_rows([22.0, 23.5, 24.0, 25.0], identity)
    b = _metrics_rows([21.0, 22.5, 23.0], identity[:3])  # P3 only in A: left out
    n, differences = compare_metrics(a, b)
    assert n == 3
    lungs = differences["psnr_lungs"]
    assert lungs["mean"] == pytest.approx(1.0) and lungs["n"] == 3
    # every paired difference is exactly 1 dB: no spread, so the CI collapses on the mean
    assert lungs["low"] == pytest.approx(1.0) and lungs["high"] == pytest.approx(1.0)
    assert differences["ssim_lungs"]["mean"] == pytest.approx(0.0)


def test_runs_on_different_preparations_are_refused():
    a = _metrics_rows([22.0, 23.0], [20.0, 21.0])
    b = _metrics_rows([21.0, 22.0], [20.0, 21.5])
    with pytest.raises(ValueError, match="P1: identity scores"):
        compare_metrics(a, b)
    with pytest.raises(ValueError, match="no patient in common"):
        compare_metrics(a, [dict(row, patient="Q") for row in b])


def _progression_run(forecasts: dict[str, list[tuple[float, float, float]]], truth: list[float],
                     labels: list[int]) -> dict:
    per_patient = {}
    for i, (fvc, y) in enumerate(zip(truth, labels)):
        entry = {"fvc_initial": 3000.0, "fvc_followup": fvc, "progression": y}
        for name, values in forecasts.items():
            m, s, p = values[i]
            entry[name] = {"fvc_ml": m, "sigma_ml": s, "probability": p}
        per_patient[f"P{i}"] = entry
    return {"rows": {name: {} for name in forecasts}, "per_patient": per_patient}


def test_progression_differences_match_hand_computed_values():
    truth, labels = [2600.0, 2950.0, 2500.0, 2900.0], [1, 0, 1, 0]
    # A ranks the progressors first (AUC 1); B ranks them last (AUC 0); A's errors are 0 ml, B's 100 ml
    a = _progression_run({"image": [(t, 100.0, p) for t, p in zip(truth, [0.9, 0.2, 0.8, 0.1])]}, truth, labels)
    b = _progression_run({"image": [(t + 100.0, 100.0, p) for t, p in zip(truth, [0.1, 0.8, 0.2, 0.9])]},
                         truth, labels)
    n, results = compare_progression(a, b, n_resamples=200)
    assert n == 4
    # per patient: A scores -ln(sqrt(2) 100), B that minus sqrt(2) * 100 / 100
    assert results["image"]["laplace"]["mean"] == pytest.approx(math.sqrt(2.0))
    assert results["image"]["laplace"]["ci"] == pytest.approx((math.sqrt(2.0), math.sqrt(2.0)))
    assert results["image"]["auc"]["mean"] == pytest.approx(1.0)
    low, high = results["image"]["auc"]["ci"]
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    expected = laplace_log_likelihood(truth, truth, 100.0) - laplace_log_likelihood(truth, np.add(truth, 100.0), 100.0)
    assert results["image"]["laplace"]["mean"] == pytest.approx(float(expected.mean()))


def test_progression_runs_of_other_cohorts_are_refused():
    a = _progression_run({"image": [(2600.0, 100.0, 0.5)] * 2}, [2600.0, 2700.0], [1, 0])
    b = _progression_run({"image": [(2600.0, 100.0, 0.5)] * 2}, [2600.0, 2710.0], [1, 0])
    with pytest.raises(ValueError, match="not of the same cohort"):
        compare_progression(a, b)


def test_report_reads_either_kind_of_folder_and_the_cli_refuses_others(tmp_path, monkeypatch, capsys):
    identity = [20.0, 21.0, 22.0]
    folder_a = _write_metrics(tmp_path / "a", _metrics_rows([21.0, 22.0, 23.5], identity))
    folder_b = _write_metrics(tmp_path / "b", _metrics_rows([20.5, 21.5, 23.0], identity))
    text = report(folder_a, folder_b)
    assert "3 patients" in text and "| psnr_lungs | +0.500 [+0.500, +0.500] |" in text

    out = tmp_path / "comparison.md"
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", str(folder_a), str(folder_b), "--out", str(out)])
    main()
    assert out.read_text() == text
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", str(folder_a), str(tmp_path / "empty")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and "neither metrics.csv nor progression.json" in capsys.readouterr().err

    run = _progression_run({"image": [(2600.0, 100.0, 0.5)] * 2}, [2600.0, 2700.0], [1, 0])
    for name in ("c", "d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "progression.json").write_text(json.dumps(run))
    assert "| image | +0.000 [+0.000, +0.000] | +0.000 [+0.000, +0.000] |" in report(tmp_path / "c", tmp_path / "d")
