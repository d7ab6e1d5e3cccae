"""Does the predicted disease grow with the interval asked for, as much as the cohort's disease does?

Every case of a prepared cohort the model never saw is predicted (mean prediction) at each
interval of ``--weeks`` (default 26, 52 and 78 weeks) from the same initial scan and record. Two
measures of the change, each computed the same way on the prediction and on the truth:

- lung density change: mean of (follow-up - initial) in HU over the lungs;
- new fibrosis: ml of high-attenuation area (``custom.fibrosis``) the follow-up has and the initial
  scan has not.

The truth is the case's real follow-up at its own interval W (``FollowupWeeks``), and for the
density change also the generator's oracle (the follow-up without motion and noise). The
synthetic cohort's disease advances linearly with time (``custom.synthetic.sample_patient``:
decline = yearly rate x W / 52), so the truth at w weeks is the truth at W times w / W; the table
puts the predictions beside it, with the patient-level correlation of the predicted and true
rates. ``--also-own`` also predicts at W, to score the lungs PSNR with each case's own interval
against the same model given the default 52 weeks (``custom.evaluation`` reports of both).

    python scripts/evaluate_interval.py --prepared data/heldout/prepared --out runs/interval --also-own
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.evaluation import case_rows, paired_difference, write_report  # noqa: E402
from custom.fibrosis import high_attenuation_area  # noqa: E402
from custom.geometry import denormalize, voxel_spacing  # noqa: E402
from custom.io import atomic_write_bytes, write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_heldout import build, case_context, common_arguments, datalist_entries, load_case, parse_overrides  # noqa: E402


def change_measures(followup: np.ndarray, initial: np.ndarray, lungs: np.ndarray, spacing: np.ndarray,
                    initial_haa: np.ndarray) -> dict[str, float]:
    """Lung density change (HU) and new fibrosis (ml) of a follow-up against the initial scan.

    Args:
        followup: the follow-up on the model grid, in [0, 1].
        initial: the initial scan on the model grid, in [0, 1].
        lungs: lung labels on the grid.
        spacing: voxel size in mm.
        initial_haa: HAA mask of the initial scan.
    """
    lung = lungs > 0
    hu = denormalize(followup)
    haa = high_attenuation_area(hu, lungs, spacing)
    return {"density_hu": float((hu - denormalize(initial))[lung].mean()),
            "new_fibrosis_ml": float(np.count_nonzero(haa & ~initial_haa) * np.prod(spacing) / 1000.0)}


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--weeks", type=float, nargs="+", default=[26.0, 52.0, 78.0])
    parser.add_argument("--also-own", action="store_true", help="also predict at each case's own interval")
    args = parser.parse_args()

    entries = datalist_entries(args)
    network, inferer, text_encoder = build(args.ckpt_dir, parse_overrides(args.override))
    network.eval()
    rows, own_rows, default_rows = [], [], []
    for entry in entries:
        start = time.perf_counter()
        case = load_case(entry)
        own = case["weeks"]
        y0 = torch.as_tensor(case["image"])[None]
        region = torch.as_tensor(case["mask"] > 0)
        context = case_context(text_encoder, case)
        initial, lungs = case["image"][0], case["lungs"][0]
        spacing = voxel_spacing(nib.load(entry["image"]).affine)
        initial_haa = high_attenuation_area(denormalize(initial), lungs, spacing)
        row = {"patient": case["patient"], "weeks": own}
        true = change_measures(case["target"][0], initial, lungs, spacing, initial_haa)
        row.update({f"true_{k}": v for k, v in true.items()})
        if "oracle" in case:
            row["oracle_density_hu"] = change_measures(case["oracle"][0], initial, lungs, spacing,
                                                       initial_haa)["density_hu"]
        intervals = [*args.weeks, own] if args.also_own else list(args.weeks)
        for weeks in intervals:
            prediction = inferer.predict_mean(y0, network, context, weeks)[0] * region
            if weeks in args.weeks:
                measures = change_measures(np.asarray(prediction[0]), initial, lungs, spacing, initial_haa)
                row.update({f"pred{weeks:g}_{k}": v for k, v in measures.items()})
            if args.also_own and weeks == own:
                own_rows.append(case_rows(prediction, case, args.threshold))
            if args.also_own and weeks == 52.0:
                default_rows.append(case_rows(prediction, case, args.threshold))
        rows.append(row)
        print(f"{case['patient']} ({own:g} weeks): " + ", ".join(
            f"{w:g} wk {row[f'pred{w:g}_density_hu']:+.1f} HU" for w in args.weeks)
            + f"; true {row['true_density_hu']:+.1f} HU ({time.perf_counter() - start:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, args.weeks)
    write_json(args.out / "interval.json", {"cases": rows, "summary": summary})
    text = table(summary, len(rows))
    if args.also_own:
        write_report(own_rows, args.out / "own_weeks", "mean prediction, each case's own interval")
        write_report(default_rows, args.out / "52_weeks", "mean prediction, 52 weeks for all")
        for metric in ("psnr_lungs", "psnr_change"):
            d = paired_difference(np.array([r[f"model_{metric}"] for r in own_rows]),
                                  np.array([r[f"model_{metric}"] for r in default_rows]))
            text += (f"\n{metric}: own interval minus 52 weeks for all: {d['mean']:+.3f} dB "
                     f"[{d['low']:+.3f}, {d['high']:+.3f}] (n = {d['n']})\n")
    atomic_write_bytes(args.out / "interval.md", text.encode("utf-8"))
    print(text)


def summarize(rows: list[dict], intervals: list[float]) -> dict:
    """Mean and SD over cases of the predicted and true change at each interval, and the rate correlations."""
    out: dict = {}
    for measure in ("density_hu", "new_fibrosis_ml"):
        true_rate = np.array([r[f"true_{measure}"] / r["weeks"] for r in rows])
        out[measure] = {}
        for w in intervals:
            pred, true = np.array([r[f"pred{w:g}_{measure}"] for r in rows]), true_rate * w
            out[measure][f"{w:g}"] = {"predicted": [float(pred.mean()), float(pred.std(ddof=1))],
                                      "true_scaled": [float(true.mean()), float(true.std(ddof=1))]}
        span = max(intervals) - min(intervals)
        pred_rate = np.array([(r[f"pred{max(intervals):g}_{measure}"] - r[f"pred{min(intervals):g}_{measure}"]) / span
                              for r in rows])
        out[measure]["rate_per_year"] = {
            "predicted": [float(52 * pred_rate.mean()), float(52 * pred_rate.std(ddof=1))],
            "true": [float(52 * true_rate.mean()), float(52 * true_rate.std(ddof=1))],
            "correlation": float(np.corrcoef(pred_rate, true_rate)[0, 1]),
            "cases_growing": int(np.count_nonzero(pred_rate > 0)),
        }
    oracle = [r["oracle_density_hu"] / r["weeks"] for r in rows if "oracle_density_hu" in r]
    if oracle:
        out["density_hu"]["oracle_rate_per_year"] = [float(52 * np.mean(oracle)), float(52 * np.std(oracle, ddof=1))]
    return out


def table(summary: dict, cases: int) -> str:
    """Markdown table of ``summarize``'s numbers."""
    units = {"density_hu": "lung density change (HU)", "new_fibrosis_ml": "new fibrosis (ml HAA)"}
    lines = [f"{cases} held-out patients, mean ± SD over patients; true = the real follow-up at the case's own "
             "interval, scaled linearly to each interval", ""]
    for measure, label in units.items():
        s = summary[measure]
        intervals = [k for k in s if k[0].isdigit()]
        lines += [f"| {label} | " + " | ".join(f"{w} weeks" for w in intervals) + " | per year | r (rates) |",
                  "|---" * (len(intervals) + 3) + "|"]
        rate = s["rate_per_year"]
        lines.append("| predicted | " + " | ".join(f"{s[w]['predicted'][0]:+.2f} ± {s[w]['predicted'][1]:.2f}"
                                                   for w in intervals)
                     + f" | {rate['predicted'][0]:+.2f} ± {rate['predicted'][1]:.2f} | {rate['correlation']:.2f} |")
        lines.append("| true | " + " | ".join(f"{s[w]['true_scaled'][0]:+.2f} ± {s[w]['true_scaled'][1]:.2f}"
                                              for w in intervals)
                     + f" | {rate['true'][0]:+.2f} ± {rate['true'][1]:.2f} | |")
        if "oracle_rate_per_year" in s:
            o = s["oracle_rate_per_year"]
            lines.append("| oracle (no motion, no noise) | " + " | ".join("" for _ in intervals)
                         + f" | {o[0]:+.2f} ± {o[1]:.2f} | |")
        lines += [f"\nprediction grows from {intervals[0]} to {intervals[-1]} weeks in {rate['cases_growing']} of "
                  f"{cases} patients", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
