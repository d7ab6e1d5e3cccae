"""Would the mean prediction score better smoothed? Choose on the validation fold, from saved predictions.

The mean prediction f(y0, y0, T) is the conditional mean of the follow-up only as far as the
network has learned it: the follow-up's noise is independent of the initial scan's, so the true
conditional mean carries none of y0's voxel noise, while a residual network (x0 = y0 + residual)
must learn to cancel it. This script scores, on saved mean predictions
(``evaluate_heldout.py --save-predictions``), two post-hoc estimators for each sigma (voxels):

- ``blur``: the prediction Gaussian-smoothed,
- ``residual on smoothed y0``: the predicted change (prediction - y0) added to the smoothed initial scan,

as lung and disease-change PSNR, paired against the unsmoothed prediction, identity and the smoothed
initial scan (the evaluation's reference rows; 95 % t CI). Run it on the validation fold to choose;
score the held-out cohort once with the choice.

    python scripts/sweep_output_smoothing.py --prepared data/seed2/prepared \\
        --datalist data/seed2/prepared/val_fold0.json --predictions runs/val/predictions --out runs/smoothing
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.evaluation import change_region, format_difference, paired_difference, smoothed  # noqa: E402
from custom.io import atomic_write_bytes, write_json  # noqa: E402
from custom.metrics import masked_psnr  # noqa: E402
from scripts.evaluate_heldout import common_arguments, datalist_entries, load_case  # noqa: E402

METRICS = ("psnr_lungs", "psnr_change")


def psnr(prediction: torch.Tensor, followup: torch.Tensor, region: torch.Tensor) -> float:
    """PSNR in the region; NaN for an empty region (a patient without new lesions), which the paired CIs skip."""
    return float(masked_psnr(prediction, followup, region)) if bool(region.any()) else float("nan")


def variants(prediction: torch.Tensor, y0: torch.Tensor, region: torch.Tensor, sigmas: list[float]) -> dict:
    """The prediction as saved and each post-hoc estimator, all kept inside the region (tensors (1, D, H, W))."""
    out = {"model": prediction}
    for sigma in sigmas:
        out[f"blur {sigma}"] = smoothed(prediction, region, sigma)
        out[f"residual on smoothed y0 {sigma}"] = (prediction - y0 + smoothed(y0, region, sigma)) * region
    return out


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--predictions", type=Path, required=True, help="<patient>.nii.gz mean predictions")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.75, 1.0])
    args = parser.parse_args()
    per_variant: dict[str, dict[str, list[float]]] = {}
    references = {name: {m: [] for m in METRICS} for name in ("identity", "smoothed")}
    for entry in datalist_entries(args):
        case = load_case(entry)
        prediction = np.asarray(nib.load(args.predictions / f"{case['patient']}.nii.gz").dataobj, dtype=np.float32)
        region = torch.as_tensor(case["mask"] > 0)
        y0, x0, lungs = (torch.as_tensor(case[k]) for k in ("image", "target", "lungs"))
        new_lesions = torch.as_tensor(case["new_lesions"]) if "new_lesions" in case else None
        regions = {"psnr_lungs": lungs > 0, "psnr_change": change_region(y0, x0, lungs, args.threshold, new_lesions)}
        for name, values in variants(torch.as_tensor(prediction[None]), y0, region, args.sigmas).items():
            scores = per_variant.setdefault(name, {m: [] for m in METRICS})
            for m in METRICS:
                scores[m].append(psnr(values, x0, regions[m]))
        for name, values in (("identity", y0), ("smoothed", smoothed(y0, region))):
            for m in METRICS:
                references[name][m].append(psnr(values, x0, regions[m]))
        print(f"{case['patient']}: " + ", ".join(f"{n} {s['psnr_lungs'][-1]:.2f}" for n, s in per_variant.items()),
              flush=True)
    model = per_variant["model"]
    against = {"identity": references["identity"], "smoothed": references["smoothed"], "model": model}
    lines = [f"{len(model['psnr_lungs'])} cases of {args.datalist or args.prepared}; paired differences, "
             "mean [95 % CI], dB", "",
             "| estimator | " + " | ".join(f"{m.removeprefix('psnr_')} vs {a}" for m in METRICS for a in against)
             + " |",
             "|---" * (1 + len(METRICS) * len(against)) + "|"]
    report = {}
    for name, scores in per_variant.items():
        cells, report[name] = [], {}
        for m in METRICS:
            for label, baseline in against.items():
                d = paired_difference(np.array(scores[m]), np.array(baseline[m]))
                report[name][f"{m}_vs_{label}"] = d
                cells.append(format_difference(d))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "smoothing.md", table.encode("utf-8"))
    write_json(args.out / "smoothing.json", report)


if __name__ == "__main__":
    main()
