"""The synthetic cohort's ceiling for forecasting progression from the baseline, over a large draw of patients.

Draws ``--patients`` patients from ``custom.synthetic.sample_patient`` (tables only, no images) and
scores the forecast of the generator's own law given the baseline (``custom.synthetic.decline_law``
through ``custom.progression.forecast_from_declines``): the population AUC of progression and the
OSIC log-likelihood no predictor of (initial scan, record, interval) exceeds in expectation, and the
spread of that AUC over random held-out sets of ``--held-out`` patients with ``--progressors``
progressors (what a held-out table of that size can show).

    python scripts/progression_ceiling.py --patients 20000 --seed 101 --held-out 40 --progressors 15
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.progression import forecast_from_declines, laplace_log_likelihood  # noqa: E402
from custom.synthetic import decline_law, patient_rng, sample_patient  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=101, help="cohort seed of the draw (not a held-out seed)")
    parser.add_argument("--held-out", type=int, default=40, help="size of the held-out sets")
    parser.add_argument("--progressors", type=int, default=15, help="progressors in each held-out set")
    parser.add_argument("--target", type=float, default=0.867, help="AUC whose reach is reported")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()

    patients = [sample_patient(f"P{i}", patient_rng(args.seed, i)) for i in range(args.patients)]
    labels = np.array([p.progression for p in patients])
    law = np.array([forecast_from_declines(p.fvc, decline_law(p.percent, p.smoking, p.weeks, quantiles=400))
                    for p in patients])
    score = laplace_log_likelihood([p.followup_fvc for p in patients], law[:, 0], law[:, 1])
    rng = np.random.default_rng(0)
    positive, negative = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    aucs = []
    for _ in range(args.resamples):
        pick = np.concatenate([rng.choice(positive, args.progressors, replace=False),
                               rng.choice(negative, args.held_out - args.progressors, replace=False)])
        aucs.append(roc_auc_score(labels[pick], law[pick, 2]))
    low, median, high = np.percentile(aucs, [2.5, 50, 97.5])
    print(f"{args.patients} patients (seed {args.seed}), {labels.mean():.1%} progressors")
    print(f"ceiling from the baseline: AUC {roc_auc_score(labels, law[:, 2]):.3f}, "
          f"OSIC log-likelihood {score.mean():.3f}")
    print(f"held-out sets of {args.held_out} ({args.progressors} progressors): AUC median {median:.3f}, "
          f"95 % range [{low:.3f}, {high:.3f}], P(AUC >= {args.target}) = {np.mean(np.array(aucs) >= args.target):.2f}")


if __name__ == "__main__":
    main()
