"""Choose kappa by validation: train one denoiser per kappa, score the mean, one sample and x0 at every step.

For each kappa, ``configs/train.json`` trains with ``scheduler#kappa`` overridden (all else as
given by ``--override``) on the training folds; then, on the validation fold only (never the test
split), it scores in the lungs, as paired gains over identity:

- the mean prediction (one call at t = T on y0, the product),
- one T-step posterior sample (what a user gets with ``prediction="sample"``),
- the x0 prediction f(x_t, y0, t) from the true x_t ~ q(x_t | x0, y0) at every step t: where the
  network's knowledge breaks down along the chain.

    python scripts/sweep_kappa.py --prepared data/prepared --out runs/kappa --kappas 2.0 0.5 0.2 0.1 \\
        --override max_epochs=8 --cases 5

``--demo`` trains and scores at the demo's scale (``cirresdiff_bundle.demo.DEMO_SETTINGS``: its training
settings and the 4 mm grid; ``--prepared`` must then be prepared on that grid). The table also has each
kappa's paired difference to the configs' kappa (``ResidualShiftScheduler``'s default) on the same cases.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cirresdiff_bundle.runner import run_config  # noqa: E402
from custom.data import DatasetSplit  # noqa: E402
from custom.evaluation import paired_difference  # noqa: E402
from custom.io import atomic_write_bytes, write_json  # noqa: E402
from custom.metrics import masked_psnr  # noqa: E402
from custom.scheduler import ResidualShiftScheduler  # noqa: E402
from scripts.evaluate_heldout import build, case_context, load_case, parse_overrides  # noqa: E402

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def score(kappa: float, ckpt_dir: Path, cases: list[dict], seed: int, overrides: dict) -> dict:
    """Lung-PSNR gains over identity of the mean, one sample and f(x_t, y0, t) at every t, on ``cases``.

    Args:
        kappa: the noise scale the denoiser was trained with.
        ckpt_dir: folder of its ``model.pt`` and ``text_encoder/``.
        cases: validation datalist entries.
        seed: seed of the sample and of the noise of x_t.
        overrides: inference config overrides (the grid, the network's options).
    """
    # the network's own mean: the shipped smoothing was chosen for the shipped weights
    settings = {"mean_smoothing_sigma": 0.0, **overrides, "scheduler#kappa": kappa,
                "model_path": str(ckpt_dir / "model.pt")}
    network, inferer, text_encoder = build(ckpt_dir, settings)
    network.eval()
    scheduler = inferer.scheduler
    rows: dict[str, list[float]] = {"identity": [], "mean": [], "sample": []}
    steps = {t: [] for t in range(scheduler.num_train_timesteps)}
    generator = torch.Generator().manual_seed(seed)
    for entry in cases:
        case = load_case(entry)
        y0, x0 = torch.as_tensor(case["image"])[None], torch.as_tensor(case["target"])[None]
        lungs, region = torch.as_tensor(case["lungs"])[None] > 0, torch.as_tensor(case["mask"])[None] > 0
        context = case_context(text_encoder, case)

        def psnr(pred: torch.Tensor, x0: torch.Tensor = x0, lungs: torch.Tensor = lungs,
                 region: torch.Tensor = region) -> float:
            return float(masked_psnr(pred * region, x0, lungs))

        rows["identity"].append(psnr(y0))
        rows["mean"].append(psnr(inferer.predict_mean(y0, network, context)))
        rows["sample"].append(psnr(inferer.sample(y0, network, context, num_samples=1, generator=generator).mean))
        with torch.inference_mode():
            for t in steps:
                timesteps = torch.tensor([t])
                x_t = scheduler.add_noise(x0, y0, torch.randn(x0.shape, generator=generator), timesteps)
                steps[t].append(psnr(inferer.denoise(network, scheduler.scale_model_input(x_t, t), y0, t, context)))
    identity = np.array(rows["identity"])
    return {
        "identity_psnr_lungs": float(identity.mean()),
        "mean_gain": paired_difference(np.array(rows["mean"]), identity),
        "sample_gain": paired_difference(np.array(rows["sample"]), identity),
        "x0_gain_by_step": {t: float(np.mean(v) - identity.mean()) for t, v in steps.items()},
        "per_case": rows,
        "cases": len(cases),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, required=True, help="prepared cohort (datalist.json with folds)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--text-encoder", type=Path, default=BUNDLE_ROOT / "models" / "text_encoder")
    parser.add_argument("--kappas", type=float, nargs="+", default=[2.0, 0.5, 0.2, 0.1])
    parser.add_argument("--cases", type=int, default=5, help="validation cases scored per kappa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], help="train.json id=JSON value")
    parser.add_argument("--demo", action="store_true", help="the demo's training settings and 4 mm grid")
    args = parser.parse_args()
    overrides = parse_overrides(args.override)
    inference = {}
    if args.demo:
        from cirresdiff_bundle.demo import DEMO_SETTINGS

        overrides, inference = {**DEMO_SETTINGS["train"], **overrides}, DEMO_SETTINGS["inference"]
    cases = DatasetSplit(args.prepared / "datalist.json", val_fold=0).validation(args.cases)
    results = {}
    for kappa in args.kappas:
        run = args.out / f"kappa_{kappa}"
        ckpt = run / "models"
        ckpt.mkdir(parents=True, exist_ok=True)
        if not (ckpt / "text_encoder").exists():
            (ckpt / "text_encoder").symlink_to(args.text_encoder.resolve())
        if not (run / "result.json").is_file():
            run_config(["train"], run_id="run", **{"dataset_dir": str(args.prepared), "ckpt_dir": str(ckpt),
                                                   "output_dir": str(run / "train"),
                                                   "model_path": str(ckpt / "model.pt"),
                                                   "min_gain_db": -1000.0, "num_val_cases": args.cases,
                                                   "scheduler#kappa": kappa, **overrides})
            result = score(kappa, ckpt, cases, args.seed, inference)
            write_json(run / "result.json", result)
        results[kappa] = json.loads((run / "result.json").read_text(encoding="utf-8"))
        r = results[kappa]
        print(f"kappa {kappa}: mean {r['mean_gain']['mean']:+.2f} dB, one sample {r['sample_gain']['mean']:+.2f} dB "
              f"(lungs, vs identity, {r['cases']} validation cases)", flush=True)
    default = inspect.signature(ResidualShiftScheduler).parameters["kappa"].default
    reference = results.get(default)
    lines = ["| kappa | mean prediction gain (dB) | one-sample gain (dB) | x0 gain at t = 1 / 8 / 15 (dB) "
             f"| mean prediction - kappa {default} (dB) |", "|---|---|---|---|---|"]
    for kappa, r in results.items():
        by = r["x0_gain_by_step"]
        cells = [f"{r[k]['mean']:+.2f} [{r[k]['low']:+.2f}, {r[k]['high']:+.2f}]" for k in ("mean_gain", "sample_gain")]
        versus = "-"
        if reference is not None and kappa != default:
            d = paired_difference(np.array(r["per_case"]["mean"]), np.array(reference["per_case"]["mean"]))
            versus = f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
        lines.append(f"| {kappa} | {cells[0]} | {cells[1]} | {by['0']:+.2f} / {by['7']:+.2f} / {by['14']:+.2f} "
                     f"| {versus} |")
    atomic_write_bytes(args.out / "kappa.md", ("\n".join(lines) + "\n").encode("utf-8"))
    write_json(args.out / "kappa.json", results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
