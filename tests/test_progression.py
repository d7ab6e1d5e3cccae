"""The OSIC Laplace log-likelihood, progression labels and probabilities, the bootstrap CI and the FVC forecaster."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from custom.progression import (
    FVCForecaster,
    auc_with_ci,
    bootstrap_ci,
    brier_score,
    forecast_from_declines,
    laplace_log_likelihood,
    optimal_sigma,
    progression_labels,
    progression_probability,
)


def test_laplace_log_likelihood_on_hand_computed_values():
    scores = laplace_log_likelihood([2000, 2000, 2000, 2000], [2100, 2000, 3500, 1900], [100, 50, 200, 100])
    # error 100, sigma 100: -sqrt(2) - ln(100 sqrt(2))
    assert scores[0] == pytest.approx(-math.sqrt(2) - math.log(100 * math.sqrt(2)))
    # sigma 50 is clipped to 70, error 0
    assert scores[1] == pytest.approx(-math.log(70 * math.sqrt(2)))
    # error 1500 is clipped to 1000
    assert scores[2] == pytest.approx(-math.sqrt(2) * 1000 / 200 - math.log(200 * math.sqrt(2)))
    assert scores[3] == pytest.approx(scores[0])  # symmetric in the sign of the error
    assert laplace_log_likelihood([2000], [2100], 100.0)[0] == pytest.approx(scores[0])  # one sigma for all
    with pytest.raises(ValueError, match="true and"):
        laplace_log_likelihood([1, 2], [1], 100)


def test_optimal_sigma_maximises_the_mean_score():
    errors = np.array([30.0, 150.0, 400.0, 2000.0])
    best = optimal_sigma(errors)
    assert best == pytest.approx(math.sqrt(2) * (30 + 150 + 400 + 1000) / 4)
    grid = np.linspace(70, 2000, 2000)
    means = [laplace_log_likelihood(errors, np.zeros(4), s).mean() for s in grid]
    assert grid[int(np.argmax(means))] == pytest.approx(best, abs=1.0)
    assert optimal_sigma([0.0, 1.0]) == 70.0


def test_progression_label_is_a_ten_percent_decline():
    assert progression_labels([2000, 2000, 2000, 3000], [1800, 1801, 2100, 2500]).tolist() == [1, 0, 0, 1]


def test_progression_probability_is_the_laplace_cdf_at_ninety_percent():
    # the forecast sits on the threshold: probability one half
    assert progression_probability([2000], [1800], 100)[0] == pytest.approx(0.5)
    # one Laplace scale (100 / sqrt 2) above the threshold: 0.5 exp(-1)
    assert progression_probability([2000], [1800 + 100 / math.sqrt(2)], 100)[0] == pytest.approx(0.5 * math.exp(-1))
    assert progression_probability([2000], [1800 - 100 / math.sqrt(2)], 100)[0] == pytest.approx(1 - 0.5 * math.exp(-1))
    # the same, by sampling the distribution the OSIC score is the log-density of
    rng = np.random.default_rng(0)
    draws = rng.laplace(1850.0, 120 / math.sqrt(2), 200_000)
    assert progression_probability([2000], [1850], 120)[0] == pytest.approx((draws <= 1800).mean(), abs=0.005)


def test_forecast_from_declines_on_hand_computed_values():
    # FVC 1000 ml, declines 0 / 10 / 20 %: follow-ups 1000 / 900 / 800, median 900, mean |error| 200/3
    fvc, sigma, probability = forecast_from_declines(1000.0, [0.0, 0.1, 0.2])
    assert fvc == 900.0 and math.isclose(sigma, math.sqrt(2.0) * 200.0 / 3.0)
    assert math.isclose(probability, 2.0 / 3.0)
    # a certain future is clipped to the metric's smallest sigma
    assert forecast_from_declines(2000.0, [0.05] * 4) == (1900.0, 70.0, 0.0)


def test_brier_score():
    assert brier_score([1, 0, 1, 0], [1.0, 0.0, 0.5, 0.25]) == pytest.approx((0 + 0 + 0.25 + 0.0625) / 4)


def test_bootstrap_ci_covers_the_statistic_and_shrinks_with_more_patients():
    rng = np.random.default_rng(1)
    small, large = rng.normal(5.0, 1.0, 20), rng.normal(5.0, 1.0, 500)
    low_s, high_s = bootstrap_ci(np.mean, small, n_resamples=1000)
    low_l, high_l = bootstrap_ci(np.mean, large, n_resamples=1000)
    assert low_s < small.mean() < high_s and low_l < large.mean() < high_l
    assert high_l - low_l < (high_s - low_s) / 3
    # the normal theory width 2 x 1.96 sd / sqrt(n), within 20 %
    assert high_l - low_l == pytest.approx(2 * 1.96 * large.std() / math.sqrt(500), rel=0.2)
    assert bootstrap_ci(np.mean, small, n_resamples=500, seed=3) == bootstrap_ci(np.mean, small, n_resamples=500,
                                                                                 seed=3)
    with pytest.raises(ValueError, match="one value per patient"):
        bootstrap_ci(np.mean, small, large)


def test_auc_ci_redraws_resamples_of_one_class_and_needs_both_outcomes():
    labels = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1])  # many resamples hold one class only
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.35])
    result = auc_with_ci(labels, scores, n_resamples=300)
    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert 0.0 <= result["low"] <= result["auc"] <= result["high"] <= 1.0 and result["high"] - result["low"] > 0.1
    with pytest.raises(ValueError, match="both outcomes"):
        auc_with_ci([0, 0, 0], [0.1, 0.2, 0.3])


def test_forecaster_rows_no_decline_tabular_and_informative_features():
    rng = np.random.default_rng(0)
    n = 200
    fvc0 = rng.uniform(1500, 3500, n)
    weeks = rng.uniform(26, 70, n)
    hidden = rng.normal(0, 1, n)  # what only an "image" feature sees
    fvc1 = fvc0 * (1 - 0.002 * weeks - 0.05 * hidden) + rng.normal(0, 20, n)
    train, test = slice(0, 150), slice(150, None)

    def score(forecaster, features):
        forecaster.fit(features[train], fvc0[train], fvc1[train])
        mean, sigma = forecaster.predict(features[test], fvc0[test])
        return laplace_log_likelihood(fvc1[test], mean, sigma).mean(), sigma[0]

    none = np.empty((n, 0))
    no_decline, sigma_none = score(FVCForecaster(no_change=True), none)
    mean_change, _ = score(FVCForecaster(), none)
    tabular, sigma_tab = score(FVCForecaster(), np.stack([weeks, fvc0], 1))
    image, sigma_img = score(FVCForecaster(), np.stack([weeks, fvc0, hidden * fvc0], 1))
    assert no_decline < mean_change < tabular < image
    assert sigma_img < sigma_tab < sigma_none  # more information, tighter honest sigma
    with pytest.raises(RuntimeError, match="fit"):
        FVCForecaster().predict(none, fvc0)
    with pytest.raises(ValueError, match="finite"):
        FVCForecaster().fit(np.full((3, 1), np.nan), [1, 2, 3], [1, 2, 3])


def _constructed_cohort(folder, n: int = 40):
    """Prepared pairs in which only the follow-up scan shows how much FVC fell: a slab of the lungs turns
    high-attenuation (-400 HU) in proportion to the decline; the generated follow-up is a noisy copy."""
    import json

    from custom.geometry import normalize_hu
    from custom.io import write_nifti

    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    lungs = np.zeros((20, 20, 20), np.uint8)
    lungs[3:17, 3:17, 2:18] = 1
    entries = []
    for i in range(n):
        pid = f"P{i:03d}"
        decline = float(rng.uniform(0.0, 0.25))
        initial = np.where(lungs > 0, -850.0, 40.0).astype(np.float32)
        followup = initial.copy()
        followup[3:17, 3:17, 2:2 + int(round(decline * 60))] = -400.0
        generated = followup + rng.normal(0.0, 20.0, followup.shape).astype(np.float32) * (lungs > 0)
        for name, hu in (("image", initial), ("target", followup)):
            write_nifti(folder / pid / f"{name}.nii.gz", normalize_hu(hu), affine)
        write_nifti(folder / "predictions" / f"{pid}.nii.gz", normalize_hu(generated), affine)
        write_nifti(folder / pid / "lungs.nii.gz", lungs, affine)
        fvc = float(rng.uniform(1800, 3600))
        record = {"FVC": fvc, "Percent": float(rng.uniform(50, 100)), "Age": 70, "Sex": "Male",
                  "SmokingStatus": "Ex-smoker"}
        entries.append({"patient": pid, "image": f"{pid}/image.nii.gz", "target": f"{pid}/target.nii.gz",
                        "lungs": f"{pid}/lungs.nii.gz", "record": record,
                        "followup_record": {"FollowupWeeks": 52, "FollowupFVC": round(fvc * (1 - decline))}})
    (folder / "datalist.json").write_text(json.dumps({"training": entries, "testing": []}), encoding="utf-8")
    return folder


def test_evaluate_progression_script_ranks_the_rows_by_what_they_can_know(tmp_path, monkeypatch):
    """On a cohort where the decline is visible only in the follow-up scan, the image rows must beat the
    tabular one in log-likelihood and AUC, and the report, table and figure must be written."""
    import json
    import runpy
    import sys
    from pathlib import Path

    cohort = _constructed_cohort(tmp_path / "prepared")
    script = Path(__file__).resolve().parents[1] / "scripts" / "evaluate_progression.py"
    monkeypatch.setattr(sys, "argv", ["evaluate_progression.py", "--prepared", str(cohort), "--predictions",
                                      str(cohort / "predictions"), "--out", str(tmp_path / "out"), "--cohort-law"])
    runpy.run_path(str(script), run_name="__main__")
    report = json.loads((tmp_path / "out" / "progression.json").read_text(encoding="utf-8"))
    rows = report["rows"]
    tabular, real, generated = (rows[k] for k in ("tabular (record + interval)", "image, real follow-up",
                                                  "image, generated follow-up"))
    assert real["auc"]["auc"] > 0.9 > tabular["auc"]["auc"] and generated["auc"]["auc"] > 0.9
    assert real["laplace_vs_tabular"]["ci"][0] > 0 and generated["laplace_vs_tabular"]["ci"][0] > 0
    assert real["mae_ml"] < 0.5 * tabular["mae_ml"]
    # the generator's law is not this constructed cohort's: the row exists and is scored like the others
    law = rows["cohort law from baseline (ceiling)"]
    assert 0.0 <= law["brier"] <= 1.0 and math.isfinite(law["laplace_log_likelihood"])
    assert len(report["per_patient"]) == 40 and "| image, generated follow-up |" in (
        tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert (tmp_path / "out" / "progression_roc_reliability.png").stat().st_size > 10_000


def test_shipped_forecaster_round_trips_through_json_and_checks_its_inputs(tmp_path):
    from custom.clinical.text import RecordError
    from custom.progression import TABULAR_FEATURES, ShippedForecaster, check_weeks, tabular_features

    rng = np.random.default_rng(2)
    records = [{"FVC": float(rng.uniform(1500, 3500)), "Percent": float(rng.uniform(40, 100)), "Age": 70,
                "Sex": "Male", "SmokingStatus": "Ex-smoker"} for _ in range(60)]
    weeks = rng.uniform(26, 70, 60)
    fvc0 = np.array([r["FVC"] for r in records])
    fvc1 = fvc0 * (1 - 0.1 * weeks / 52) + rng.normal(0, 30, 60)
    features = np.array([[tabular_features(r, w)[k] for k in TABULAR_FEATURES] for r, w in zip(records, weeks)])
    shipped = ShippedForecaster(FVCForecaster().fit(features, fvc0, fvc1), TABULAR_FEATURES, provenance="test")
    loaded = ShippedForecaster.load(shipped.save(tmp_path / "forecaster.json"))
    record = {"FVC": 2500, "Percent": 70, "Age": 70, "Sex": "male", "SmokingStatus": "ex-smoker"}  # other spelling
    at = {w: loaded.forecast(record, w) for w in (26, 52, 78)}
    assert at[52] == pytest.approx(shipped.forecast(record, 52)) and loaded.provenance == "test"
    # the cohort's decline grows with the interval, and so does the forecast's
    assert at[26]["fvc_ml"] > at[52]["fvc_ml"] > at[78]["fvc_ml"]
    assert at[26]["progression_probability"] < at[52]["progression_probability"] < at[78]["progression_probability"]
    assert at[52]["decline_percent"] == pytest.approx(100 * (2500 - at[52]["fvc_ml"]) / 2500)
    assert at[52]["fvc_ml"] == pytest.approx(2500 * (1 - 0.1), abs=60)
    for bad in (-4, 0, 1000, float("nan"), "soon", None):
        with pytest.raises(ValueError, match="weeks must"):
            check_weeks(bad)
    with pytest.raises(RecordError, match="needs FVC"):
        loaded.forecast({"Percent": 70, "Age": 70}, 52)
    (tmp_path / "broken.json").write_text('{"features": ["weeks"]}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a forecaster"):
        ShippedForecaster.load(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="unknown forecaster features"):
        ShippedForecaster(loaded.forecaster, ["height"])
