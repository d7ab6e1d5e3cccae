"""Paired comparison of two evaluations of the same patients: is model A better than model B, by how much?

Both folders come from one script run twice on one prepared cohort, with two models:

- ``scripts/evaluate_heldout.py`` (``metrics.csv``): every model metric, A - B per patient, the mean
  with a 95 % Student-t CI over patients (``custom.evaluation.paired_difference``);
- ``scripts/evaluate_progression.py`` (``progression.json``): per forecaster row present in both, the
  OSIC Laplace log-likelihood and the progression AUC, A - B with a 95 % paired patient bootstrap
  (the patients resampled together for both runs, ``custom.progression.bootstrap_ci``).

Only patients scored in both runs are compared. Runs whose reference values differ (identity's
PSNR, the measured follow-up FVC) were not made on the same data and are refused.

    python scripts/compare_runs.py runs/new/heldout runs/old/heldout
    python scripts/compare_runs.py runs/new/progression runs/old/progression --out runs/new_vs_old.md
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.evaluation import format_difference, paired_difference  # noqa: E402
from custom.io import atomic_write_bytes  # noqa: E402
from custom.progression import bootstrap_ci, laplace_log_likelihood  # noqa: E402

METRICS_FILE, PROGRESSION_FILE = "metrics.csv", "progression.json"


def _number(text: str) -> float:
    return float(text) if text not in ("", None) else float("nan")


def compare_metrics(rows_a: list[dict], rows_b: list[dict]) -> tuple[int, dict[str, dict[str, float]]]:
    """Paired difference A - B of every ``model_*`` metric over the patients of both runs.

    Args:
        rows_a: per-patient rows of run A (``metrics.csv`` of ``evaluate_heldout.py``).
        rows_b: the same for run B.
    """
    b_by_patient = {row["patient"]: row for row in rows_b}
    shared = [row for row in rows_a if row["patient"] in b_by_patient]
    if not shared:
        raise ValueError("the two runs have no patient in common")
    for row in shared:
        a, b = _number(row["identity_psnr_lungs"]), _number(b_by_patient[row["patient"]]["identity_psnr_lungs"])
        if abs(a - b) > 1e-4:
            raise ValueError(f"{row['patient']}: identity scores {a:.4f} dB in one run and {b:.4f} dB in the other; "
                             "the runs were not scored on the same prepared cases")
    metrics = [key.removeprefix("model_") for key in shared[0] if key.startswith("model_")]
    differences = {}
    for metric in metrics:
        a = np.array([_number(row[f"model_{metric}"]) for row in shared])
        b = np.array([_number(b_by_patient[row["patient"]][f"model_{metric}"]) for row in shared])
        differences[metric] = paired_difference(a, b)
    return len(shared), differences


def _auc_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float(roc_auc_score(labels, a) - roc_auc_score(labels, b))


def compare_progression(run_a: dict, run_b: dict, n_resamples: int = 2000) -> tuple[int, dict[str, dict]]:
    """Paired difference A - B of the Laplace log-likelihood and the AUC of each forecaster row of both runs.

    Args:
        run_a: ``progression.json`` of run A (``evaluate_progression.py``).
        run_b: the same for run B.
        n_resamples: bootstrap resamples.
    """
    a, b = run_a["per_patient"], run_b["per_patient"]
    patients = sorted(set(a) & set(b))
    if not patients:
        raise ValueError("the two runs have no patient in common")
    for patient in patients:
        if a[patient]["fvc_followup"] != b[patient]["fvc_followup"]:
            raise ValueError(f"{patient}: follow-up FVC {a[patient]['fvc_followup']} ml in one run and "
                             f"{b[patient]['fvc_followup']} ml in the other; the runs are not of the same cohort")
    truth = np.array([a[p]["fvc_followup"] for p in patients], dtype=float)
    labels = np.array([a[p]["progression"] for p in patients])
    rows = [name for name in run_a["rows"] if name in run_b["rows"]]
    results = {}
    for name in rows:
        forecasts = {}
        for key, per_patient in (("a", a), ("b", b)):
            forecasts[key] = {field: np.array([per_patient[p][name][field] for p in patients], dtype=float)
                              for field in ("fvc_ml", "sigma_ml", "probability")}
        scores = {key: laplace_log_likelihood(truth, f["fvc_ml"], f["sigma_ml"]) for key, f in forecasts.items()}
        difference = scores["a"] - scores["b"]
        result = {"laplace": {"mean": float(difference.mean()),
                              "ci": bootstrap_ci(np.mean, difference, n_resamples=n_resamples)}}
        if len(set(labels.tolist())) == 2:
            pa, pb = forecasts["a"]["probability"], forecasts["b"]["probability"]
            result["auc"] = {"mean": _auc_difference(labels, pa, pb),
                             "ci": bootstrap_ci(_auc_difference, labels, pa, pb, n_resamples=n_resamples)}
        results[name] = result
    return len(patients), results


def _interval(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def report(folder_a: Path, folder_b: Path) -> str:
    """The comparison of two run folders as Markdown (which kind of run is read from the files they hold).

    Args:
        folder_a: output folder of run A.
        folder_b: output folder of run B, of the same script.
    """
    if (folder_a / METRICS_FILE).is_file() and (folder_b / METRICS_FILE).is_file():
        rows = [list(csv.DictReader((folder / METRICS_FILE).read_text().splitlines()))
                for folder in (folder_a, folder_b)]
        n, differences = compare_metrics(*rows)
        lines = [f"{folder_a} - {folder_b}: {n} patients, paired difference (mean [95 % t CI])", "",
                 "| metric | A - B |", "| --- | --- |"]
        lines += [f"| {metric} | {format_difference(d)} |" for metric, d in differences.items()]
    elif (folder_a / PROGRESSION_FILE).is_file() and (folder_b / PROGRESSION_FILE).is_file():
        runs = [json.loads((folder / PROGRESSION_FILE).read_text()) for folder in (folder_a, folder_b)]
        n, results = compare_progression(*runs)
        lines = [f"{folder_a} - {folder_b}: {n} patients, paired difference (mean [95 % patient bootstrap])", "",
                 "| forecaster | Laplace log-likelihood, A - B | AUC progression, A - B |", "| --- | --- | --- |"]
        lines += [f"| {name} | {_interval(r['laplace'])} | {_interval(r['auc']) if 'auc' in r else '-'} |"
                  for name, r in results.items()]
    else:
        raise FileNotFoundError(f"neither {METRICS_FILE} nor {PROGRESSION_FILE} in both of {folder_a} and {folder_b}: "
                                "compare two folders written by evaluate_heldout.py or by evaluate_progression.py")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path, help="output folder of model A's evaluation")
    parser.add_argument("run_b", type=Path, help="output folder of model B's evaluation (the same script and cohort)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args()
    try:
        text = report(args.run_a, args.run_b)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(text)
    if args.out is not None:
        atomic_write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
