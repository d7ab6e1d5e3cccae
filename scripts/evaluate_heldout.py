"""Score a trained model on a prepared cohort it never saw, against identity, smoothed initial and the oracle.

Every case of the prepared datalist (training and testing sections alike: the cohort is held out
as a whole, e.g. ``generate_cohort(seed=1)``) is predicted with the inference config's network,
text encoder and inferer, and scored with ``custom.evaluation`` (lungs, disease-change region,
dilated region; paired gains over identity with 95 % CIs). ``--samples N`` also scores one
posterior sample as the inferer draws it (stopped at the weights' ``sample_output_step``) and the
mean of N samples per case (slow: one network pass per reverse step).
``--save-predictions`` writes each mean prediction (model grid, [0, 1]) to
``<out>/predictions/<patient>.nii.gz``, for ``scripts/evaluate_progression.py``; ``--predictions DIR``
scores such saved predictions instead of running the model, and ``--predictions DIR1 DIR2 ...`` their
voxel-wise mean (an ensemble of models). The model gets
each case's own interval to the follow-up (``FollowupWeeks``); ``--weeks W`` gives every case W
instead (e.g. 52, to measure what the interval input is worth); ``--shift-records`` gives every case the
lung-function record of the next case in the datalist, its own scans and interval kept (what the text
input is worth to these weights: a permutation test).

    python scripts/evaluate_heldout.py --prepared data/heldout/prepared --out runs/heldout
    python scripts/evaluate_heldout.py --prepared data/heldout/prepared --out runs/heldout --samples 8 --limit 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.data import FollowupIntervald, read_datalist  # noqa: E402
from custom.evaluation import case_rows, write_report  # noqa: E402
from custom.io import write_nifti  # noqa: E402

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def load_case(entry: dict, weeks: float | None = None) -> dict:
    """The prepared images of one case as (1, D, H, W) float arrays, with its record, interval and id.

    Args:
        entry: the case's datalist entry (absolute paths).
        weeks: the interval given to the model; ``None``: the case's own ``FollowupWeeks``.
    """
    case = {"patient": entry["patient"], "record": entry.get("record"),
            "weeks": FollowupIntervald(weeks)(entry)["weeks"]}
    for key in ("image", "target", "mask", "lungs", "new_lesions", "oracle"):
        if key in entry:
            case[key] = np.asarray(nib.load(entry[key]).dataobj, dtype=np.float32)[None]
    return case


def case_context(text_encoder, case: dict) -> torch.Tensor | None:
    """The text features (1, L, D) of a case's lung-function record, ``None`` for a model without text.

    Args:
        text_encoder: the inference config's text encoder, or ``None``.
        case: ``load_case``'s dict of the case.
    """
    from custom.clinical.text import record_to_text

    return None if text_encoder is None else text_encoder([record_to_text(case["record"], case["patient"])])


def parse_overrides(pairs: list[str]) -> dict:
    """``id=value`` strings (values in JSON) as inference config overrides."""
    return {k: json.loads(v) for k, v in (pair.split("=", 1) for pair in pairs)}


def build(ckpt_dir: Path, overrides: dict):
    """The inference config's network, inferer and text encoder (models from ``ckpt_dir``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "ckpt_dir": str(ckpt_dir), **overrides})
    return (parser.get_parsed_content("network"), parser.get_parsed_content("inferer"),
            parser.get_parsed_content("text_encoder"))


def whole_chain_model(args: argparse.Namespace) -> tuple:
    """The network (in eval mode), inferer and text encoder for a study of the chain itself: every sample runs the
    whole chain and nothing is smoothed, whatever the weights' ``model.json`` says (``--override`` still applies)."""
    overrides = {"mean_smoothing_sigma": 0.0, "sample_output_step": 1, **parse_overrides(args.override)}
    network, inferer, text_encoder = build(args.ckpt_dir, overrides)
    network.eval()
    return network, inferer, text_encoder


def common_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every held-out script takes: the cohort, the output, the model and the inference overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, required=True, help="prepared cohort folder (datalist.json)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--datalist", type=Path, default=None,
                        help="datalist to score (default: <prepared>/datalist.json)")
    parser.add_argument("--ckpt-dir", type=Path, default=BUNDLE_ROOT / "models", help="model.pt and text_encoder/")
    parser.add_argument("--limit", type=int, default=None, help="score the first N cases only")
    parser.add_argument("--threshold", type=float, default=0.05, help="change threshold of cases without lesion masks")
    parser.add_argument("--override", action="append", default=[], help="inference config id=JSON value")
    return parser


def datalist_entries(args: argparse.Namespace) -> list[dict]:
    """Every case of the datalist (all sections: the cohort is held out as a whole), the first ``--limit``."""
    content = read_datalist(args.datalist or args.prepared / "datalist.json")
    return [e for section in ("training", "validation", "testing") for e in content.get(section, [])][: args.limit]


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--samples", type=int, default=0, help="also score 1 sample and the mean of N samples")
    parser.add_argument("--baselines-only", action="store_true", help="score the reference rows alone (no model)")
    parser.add_argument("--save-predictions", action="store_true", help="write each mean prediction as NIfTI")
    parser.add_argument("--predictions", type=Path, nargs="+", default=None,
                        help="score these saved mean predictions (<patient>.nii.gz) instead of running the model; "
                             "several folders: their voxel-wise mean")
    parser.add_argument("--weeks", type=float, default=None,
                        help="interval given to every case (default: each case's FollowupWeeks)")
    parser.add_argument("--shift-records", action="store_true",
                        help="give each case the next case's lung-function record (own scans and interval)")
    args = parser.parse_args()
    if args.predictions is not None and (args.samples or args.baselines_only):
        parser.error("--predictions scores saved mean predictions: no --samples or --baselines-only with it")

    entries = datalist_entries(args)
    overrides = parse_overrides(args.override)
    network = inferer = text_encoder = None
    if not args.baselines_only and args.predictions is None:
        network, inferer, text_encoder = build(args.ckpt_dir, overrides)
        network.eval()
    rows, sample_rows, times = [], {"sample": [], f"mean_of_{args.samples}": []}, []
    records = [entry.get("record") for entry in entries]
    if args.shift_records:
        records = records[1:] + records[:1]
    for entry, record in zip(entries, records):
        case = {**load_case(entry, args.weeks), "record": record}
        y0 = torch.as_tensor(case["image"])[None]
        start = time.perf_counter()
        if args.baselines_only:
            prediction = y0[0]
        elif args.predictions is not None:
            saved = [np.asarray(nib.load(folder / f"{case['patient']}.nii.gz").dataobj, dtype=np.float32)
                     for folder in args.predictions]
            prediction = torch.as_tensor(np.mean(saved, axis=0))[None]
        else:
            context = case_context(text_encoder, case)
            region = torch.as_tensor(case["mask"] > 0)
            prediction = inferer.predict_mean(y0, network, context, case["weeks"])[0] * region
        times.append(time.perf_counter() - start)
        if args.save_predictions and not args.baselines_only:
            affine = nib.load(entry["image"]).affine
            write_nifti(args.out / "predictions" / f"{case['patient']}.nii.gz", np.asarray(prediction[0]), affine)
        rows.append(case_rows(prediction, case, args.threshold))
        if args.samples and not args.baselines_only:
            out = inferer.sample(y0, network, context, num_samples=args.samples, weeks=case["weeks"])
            # the mean of the samples is smoothed as the inferer's "sample" mode returns it; one sample is not
            mean = inferer.smooth_mean(out.mean)[0]
            for name, pred in (("sample", out.samples[0, 0]), (f"mean_of_{args.samples}", mean)):
                sample_rows[name].append(case_rows(pred * region, case, args.threshold))
        print(f"{case['patient']}: model {rows[-1]['model_psnr_lungs']:.2f} dB, identity "
              f"{rows[-1]['identity_psnr_lungs']:.2f} dB (lungs) in {times[-1]:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = {"prepared": str(args.prepared), "seconds_per_case": float(np.mean(times)), "ckpt_dir": str(args.ckpt_dir),
             "weeks": "each case's FollowupWeeks" if args.weeks is None else args.weeks,
             "records": "the next case's" if args.shift_records else "each case's own"}
    if args.predictions is not None:
        extra["predictions"] = [str(folder) for folder in args.predictions]
    summary = write_report(rows, args.out, f"mean prediction on {args.prepared}", extra)
    print((args.out / "summary.md").read_text(encoding="utf-8"))
    for name, these in sample_rows.items():
        if these:
            write_report(these, args.out / name, f"{name.replace('_', ' ')} on {args.prepared}", extra)
            print((args.out / name / "summary.md").read_text(encoding="utf-8"))
    print(json.dumps({m: summary[m]["psnr_lungs"]["vs_identity"] for m in summary
                      if isinstance(summary[m], dict) and "psnr_lungs" in summary[m]}))


if __name__ == "__main__":
    main()
