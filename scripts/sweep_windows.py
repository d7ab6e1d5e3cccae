"""Does the sliding window limit the mean prediction? Other windows and mirrored inputs, on the validation fold.

The mean prediction is blended from windows of the training patch size (``inference.json``: 32^3,
overlap 0.25, a Gaussian importance map of SD 0.125 x the window), so each voxel comes mostly from
the one window whose centre is nearest, and a window sees 64 mm of context at 2 mm. This script
predicts the validation fold once per window setting (``roi,overlap,sigma_scale``) and once per
mirrored input (``--flips``: the scan flipped along an axis, the prediction flipped back and
averaged with the first setting's, a test-time augmentation), each as the inferer returns it (the
weights' smoothing included), and scores it against the first setting: lungs and new-lesion PSNR,
paired per case with a 95 % t CI, beside the gain over identity and the seconds per case.
Run it on the validation fold; the held-out cohort is scored once, with the choice.

    python scripts/sweep_windows.py --prepared data/seed2/prepared --out runs/windows \\
        --windows 32,0.25,0.125 32,0.5,0.25 48,0.25,0.125 64,0.25,0.125 --flips 0 1 2
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.evaluation import change_region, format_difference, paired_difference  # noqa: E402
from custom.io import atomic_write_bytes, write_json  # noqa: E402
from scripts import evaluate_heldout as heldout  # noqa: E402
from scripts.sweep_output_smoothing import psnr  # noqa: E402

REGIONS = ("lungs", "change")


def window_overrides(setting: str) -> dict:
    """``roi,overlap,sigma_scale`` as inference config overrides."""
    roi, overlap, sigma_scale = setting.split(",")
    return {"sw_roi_size": [int(roi)] * 3, "sw_overlap": float(overlap), "sw_sigma_scale": float(sigma_scale)}


def main() -> None:
    parser = heldout.common_arguments(__doc__)
    parser.add_argument("--windows", nargs="+", default=["32,0.25,0.125", "32,0.5,0.25", "48,0.25,0.125"],
                        help="roi,overlap,sigma_scale per setting; the first is the reference")
    parser.add_argument("--flips", type=int, nargs="*", default=[],
                        help="spatial axes (0-2) to mirror, each averaged with the reference setting")
    args = parser.parse_args()
    overrides = heldout.parse_overrides(args.override)
    models = {w: heldout.build(args.ckpt_dir, {**overrides, **window_overrides(w)}) for w in args.windows}
    for network, _, _ in models.values():
        network.eval()
    names = list(args.windows) + [f"{args.windows[0]} + flip {axis}" for axis in args.flips]
    scores = {name: {r: [] for r in REGIONS} for name in ["identity", *names]}
    seconds = {name: [] for name in names}
    for entry in heldout.datalist_entries(args):
        case = heldout.load_case(entry)
        y0 = torch.as_tensor(case["image"])[None]
        x0, lungs = torch.as_tensor(case["target"]), torch.as_tensor(case["lungs"]) > 0
        region = torch.as_tensor(case["mask"] > 0)
        new_lesions = torch.as_tensor(case["new_lesions"]) if "new_lesions" in case else None
        regions = {"lungs": lungs, "change": change_region(y0[0], x0, lungs, args.threshold, new_lesions)}
        # every setting has the same weights and text encoder: the record is encoded once
        context = heldout.case_context(models[names[0]][2], case)
        predictions = {"identity": y0[0]}
        for name in names:
            window, _, axis = name.partition(" + flip ")
            network, inferer, _ = models[window]
            dims = (int(axis) + 2,) if axis else ()
            start = time.perf_counter()
            mean = inferer.predict_mean(torch.flip(y0, dims), network, context, case["weeks"])
            mean = torch.flip(mean, dims)[0]
            predictions[name] = (mean + predictions[window]) / 2 if axis else mean
            # a mirrored input costs its own pass and the reference's
            seconds[name].append(time.perf_counter() - start + (seconds[window][-1] if axis else 0.0))
        for name, prediction in predictions.items():
            for r in REGIONS:
                scores[name][r].append(psnr(prediction * region, x0, regions[r]))
        print(f"{case['patient']}: " + ", ".join(f"{n} {scores[n]['lungs'][-1]:.2f}" for n in scores), flush=True)
    reference = scores[names[0]]
    lines = [f"{len(reference['lungs'])} cases of {args.datalist or args.prepared}; lungs and new-lesion PSNR, paired "
             f"differences to the reference window {names[0]} (mean [95 % CI], dB)", "",
             "| setting | s per case | lungs vs identity | lungs vs reference | new lesions vs reference |",
             "| --- | --- | --- | --- | --- |"]
    report = {}
    for name in names:
        d = {"lungs_vs_identity": paired_difference(scores[name]["lungs"], scores["identity"]["lungs"]),
             **{f"{r}_vs_reference": paired_difference(scores[name][r], reference[r]) for r in REGIONS}}
        report[name] = {**d, "seconds_per_case": float(np.mean(seconds[name]))}
        lines.append(f"| {name} | {report[name]['seconds_per_case']:.1f} | "
                     + " | ".join(format_difference(v) for v in d.values()) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "windows.md", table.encode("utf-8"))
    write_json(args.out / "windows.json", report)


if __name__ == "__main__":
    main()
