"""Fit the shipped FVC forecaster (record + interval) on a cohort's lung-function table.

    python scripts/fit_forecaster.py --cohort data/seed2/cohort --out models/forecaster.json

Every patient of ``lung_function.csv`` with ``FollowupFVC`` and ``FollowupWeeks`` is a training
row: ``custom.progression.TABULAR_FEATURES`` of the record at the initial scan and the interval,
and the follow-up FVC. The forecaster (``FVCForecaster``: ridge on the FVC change, one sigma from
cross-validated residuals) is written as JSON with its provenance; inference
(``configs/inference.json``'s ``forecaster``) forecasts the FVC ``weeks`` after the initial scan
with it. Use a cohort the evaluation never sees (the model card fits on seed 2, evaluates on seed 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.clinical.text import read_lung_function  # noqa: E402
from custom.progression import (  # noqa: E402
    TABULAR_FEATURES,
    FVCForecaster,
    ShippedForecaster,
    laplace_log_likelihood,
    tabular_features,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True, help="cohort folder with lung_function.csv")
    parser.add_argument("--out", type=Path, required=True, help="forecaster JSON to write")
    parser.add_argument("--source", default=None, help="how the cohort was made (provenance; default: its path)")
    args = parser.parse_args()

    table = read_lung_function(args.cohort / "lung_function.csv")
    rows = [(r["record"], r["followup_record"]) for r in table.values()
            if "FollowupFVC" in r["followup_record"] and "FollowupWeeks" in r["followup_record"]]
    if len(rows) < 10:
        sys.exit(f"{args.cohort}: {len(rows)} patients with a follow-up FVC; at least 10 are needed")
    features = np.array([[tabular_features(record, float(future["FollowupWeeks"]))[k] for k in TABULAR_FEATURES]
                         for record, future in rows])
    fvc0 = np.array([float(record["FVC"]) for record, _ in rows])
    fvc1 = np.array([float(future["FollowupFVC"]) for _, future in rows])
    forecaster = FVCForecaster().fit(features, fvc0, fvc1)
    mean, sigma = forecaster.predict(features, fvc0)
    shipped = ShippedForecaster(forecaster, TABULAR_FEATURES, provenance=(
        f"FVCForecaster on the record and interval of {len(rows)} patients of {args.source or args.cohort}; "
        f"sigma {forecaster.sigma:.0f} ml from 5-fold cross-validated residuals"))
    shipped.save(args.out)
    print(f"{args.out}: {len(rows)} patients, sigma {forecaster.sigma:.1f} ml, in-sample FVC MAE "
          f"{np.abs(mean - fvc1).mean():.1f} ml, in-sample Laplace log-likelihood "
          f"{laplace_log_likelihood(fvc1, mean, sigma).mean():.3f}")


if __name__ == "__main__":
    main()
