"""FVC forecast and progression on held-out patients: no-decline, tabular, image (real follow-up) and image (predicted).

    python scripts/evaluate_heldout.py --prepared data/heldout/prepared --out runs/heldout --save-predictions
    python scripts/evaluate_progression.py --prepared data/heldout/prepared --predictions runs/heldout/predictions \
        --out runs/progression

Every patient of the prepared cohort (``FollowupFVC`` and ``FollowupWeeks`` from its table) gets a
forecast of the follow-up FVC in ml with a standard deviation from each row's
``custom.progression.FVCForecaster``, cross-fitted: the patients are split into ``--folds`` folds
and each fold is forecast by a model fitted on the others, so no forecast comes from a model
that saw its patient. Rows: no decline (sigma fitted), tabular (record and interval), image with
the real follow-up and image with the generated follow-up (the tabular features plus the
high-attenuation area and mean lung HU change measured on the pair, ``custom.progression.scan_features``).
Reports the OSIC Laplace log-likelihood (mean, bootstrap CI, paired difference to the tabular row),
and for progression (relative FVC decline >= 10 %) the ROC AUC with its bootstrap CI, the
accuracy at probability 0.5 and the Brier score; draws ROC curves and a reliability plot.

``--cohort-law`` adds, for a synthetic cohort, the row of the generator's own law given the
baseline (``custom.synthetic.decline_law``: % predicted, smoking, interval): the best any forecaster
of the initial scan, record and interval can do in expectation, so the ceiling of the generated row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.data import read_datalist  # noqa: E402
from custom.geometry import denormalize, voxel_spacing  # noqa: E402
from custom.io import atomic_write_bytes, write_json, write_png  # noqa: E402
from custom.progression import (  # noqa: E402
    SCAN_FEATURES,
    TABULAR_FEATURES,
    FVCForecaster,
    auc_with_ci,
    bootstrap_ci,
    brier_score,
    forecast_from_declines,
    laplace_log_likelihood,
    progression_labels,
    progression_probability,
    scan_features,
    tabular_features,
)


def load_patients(prepared: Path, predictions: Path | None) -> list[dict]:
    """Per patient: FVC at both scans, the tabular features and the scan features of the real and generated pair."""
    content = read_datalist(prepared / "datalist.json")
    patients = []
    for entry in (e for section in ("training", "validation", "testing") for e in content.get(section, [])):
        future = entry.get("followup_record") or {}
        if "FollowupFVC" not in future or "FollowupWeeks" not in future:
            raise ValueError(f"{entry['patient']}: the table has no FollowupFVC / FollowupWeeks")
        image = nib.load(entry["image"])
        spacing = voxel_spacing(image.affine)
        initial = denormalize(np.asarray(image.dataobj, dtype=np.float32))
        lungs = np.asarray(nib.load(entry["lungs"]).dataobj) > 0
        real = denormalize(np.asarray(nib.load(entry["target"]).dataobj, dtype=np.float32))
        patient = {"patient": entry["patient"], "fvc_initial": float(entry["record"]["FVC"]),
                   "fvc_followup": float(future["FollowupFVC"]), "record": entry["record"],
                   "weeks": float(future["FollowupWeeks"]),
                   "tabular": tabular_features(entry["record"], float(future["FollowupWeeks"])),
                   "scan_real": scan_features(initial, real, lungs, spacing)}
        if predictions is not None:
            generated = denormalize(np.asarray(nib.load(predictions / f"{entry['patient']}.nii.gz").dataobj,
                                               dtype=np.float32))
            patient["scan_predicted"] = scan_features(initial, generated, lungs, spacing)
        patients.append(patient)
        print(f"{entry['patient']}: {patient['scan_real']}", flush=True)
    return patients


def feature_matrix(patients: list[dict], scan: str | None) -> np.ndarray:
    columns = [[p["tabular"][k] for k in TABULAR_FEATURES] + ([p[scan][k] for k in SCAN_FEATURES] if scan else [])
               for p in patients]
    return np.asarray(columns, dtype=float)


def cross_fitted(features: np.ndarray, fvc0: np.ndarray, fvc1: np.ndarray, no_change: bool,
                 folds: int) -> tuple[np.ndarray, np.ndarray]:
    """Forecast (mean, sigma) of every patient by a forecaster fitted on the other folds."""
    mean, sigma = np.empty_like(fvc0), np.empty_like(fvc0)
    for train, held in KFold(n_splits=folds, shuffle=True, random_state=0).split(features):
        forecaster = FVCForecaster(no_change=no_change).fit(features[train], fvc0[train], fvc1[train])
        mean[held], sigma[held] = forecaster.predict(features[held], fvc0[held])
    return mean, sigma


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = 5) -> list[dict]:
    """Observed progression rate per bin of predicted probability (equal-width bins)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    return [{"bin": [float(edges[b]), float(edges[b + 1])], "n": int((index == b).sum()),
             "mean_probability": float(probabilities[index == b].mean()),
             "observed_rate": float(labels[index == b].mean())} for b in range(bins) if (index == b).any()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, required=True, help="prepared held-out cohort (datalist.json)")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="generated follow-ups, <patient>.nii.gz (evaluate_heldout.py --save-predictions)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--folds", type=int, default=5, help="cross-fitting folds")
    parser.add_argument("--cohort-law", action="store_true",
                        help="add the synthetic cohort's law given the baseline (the ceiling of baseline forecasts)")
    args = parser.parse_args()

    patients = load_patients(args.prepared, args.predictions)
    fvc0 = np.array([p["fvc_initial"] for p in patients])
    fvc1 = np.array([p["fvc_followup"] for p in patients])
    labels = progression_labels(fvc0, fvc1)
    rows = {"no decline": (None, True), "tabular (record + interval)": (None, False),
            "image, real follow-up": ("scan_real", False)}
    if args.predictions is not None:
        rows["image, generated follow-up"] = ("scan_predicted", False)
    per_patient = {p["patient"]: {"fvc_initial": p["fvc_initial"], "fvc_followup": p["fvc_followup"],
                                  "progression": int(y)} for p, y in zip(patients, labels)}
    forecasts = {name: cross_fitted(feature_matrix(patients, scan), fvc0, fvc1, no_change, args.folds)
                 for name, (scan, no_change) in rows.items()}
    forecasts = {name: (mean, sigma, progression_probability(fvc0, mean, sigma))
                 for name, (mean, sigma) in forecasts.items()}
    if args.cohort_law:
        from custom.synthetic import decline_law

        law = np.array([forecast_from_declines(p["fvc_initial"], decline_law(
            float(p["record"]["Percent"]), p["record"]["SmokingStatus"], p["weeks"])) for p in patients])
        forecasts["cohort law from baseline (ceiling)"] = tuple(law.T)
    results, scores, probabilities = {}, {}, {}
    for name, (mean, sigma, probability) in forecasts.items():
        scores[name], probabilities[name] = laplace_log_likelihood(fvc1, mean, sigma), probability
        results[name] = {
            "laplace_log_likelihood": float(scores[name].mean()),
            "laplace_ci": bootstrap_ci(np.mean, scores[name]),
            "mae_ml": float(np.abs(fvc1 - mean).mean()), "sigma_ml": float(sigma.mean()),
            "auc": auc_with_ci(labels, probabilities[name]),
            "accuracy": float(((probabilities[name] >= 0.5) == labels).mean()),
            "brier": brier_score(labels, probabilities[name]),
            "reliability": reliability(labels, probabilities[name]),
        }
        for p, m, s, q in zip(patients, mean, sigma, probabilities[name]):
            per_patient[p["patient"]][name] = {"fvc_ml": float(m), "sigma_ml": float(s), "probability": float(q)}
    reference = "tabular (record + interval)"
    for name in results:
        if name != reference:
            difference = scores[name] - scores[reference]
            results[name]["laplace_vs_tabular"] = {"mean": float(difference.mean()),
                                                   "ci": bootstrap_ci(np.mean, difference)}

    lines = [f"{len(patients)} held-out patients ({int(labels.sum())} progressors), forecasts cross-fitted over "
             f"{args.folds} folds; CIs: 95 % patient bootstrap", "",
             "| forecaster | Laplace log-likelihood | vs tabular | FVC MAE (ml) | sigma (ml) | AUC progression | "
             "accuracy | Brier |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        vs = r.get("laplace_vs_tabular")
        vs_text = f"{vs['mean']:+.3f} [{vs['ci'][0]:+.3f}, {vs['ci'][1]:+.3f}]" if vs else "-"
        low, high = r["laplace_ci"]
        auc = r["auc"]
        lines.append(f"| {name} | {r['laplace_log_likelihood']:.3f} [{low:.3f}, {high:.3f}] | {vs_text} "
                     f"| {r['mae_ml']:.0f} | {r['sigma_ml']:.0f} | {auc['auc']:.3f} [{auc['low']:.3f}, "
                     f"{auc['high']:.3f}] | {r['accuracy']:.3f} | {r['brier']:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "summary.md", table.encode())
    write_json(args.out / "progression.json", {"prepared": str(args.prepared), "rows": results,
                                                "per_patient": per_patient})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roc, rel) = plt.subplots(1, 2, figsize=(10, 4.6))
    for name in results:
        fpr, tpr, _ = roc_curve(labels, probabilities[name])
        roc.plot(fpr, tpr, label=f"{name} (AUC {results[name]['auc']['auc']:.2f})")
        bins = results[name]["reliability"]
        rel.plot([b["mean_probability"] for b in bins], [b["observed_rate"] for b in bins], "o-", label=name)
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title="progression: ROC")
    rel.plot([0, 1], [0, 1], ":", color="grey")
    rel.set(xlabel="predicted probability (bin mean)", ylabel="observed progression rate", title="reliability",
            xlim=(0, 1), ylim=(0, 1))
    roc.legend(fontsize=7, loc="lower right")
    rel.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    write_png(args.out / "progression_roc_reliability.png", fig, dpi=100)
    plt.close(fig)
    print(json.dumps({n: r["auc"] for n, r in results.items()}))


if __name__ == "__main__":
    main()
