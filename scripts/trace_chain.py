"""Where a sample goes wrong: the x0 prediction at every step of the chain, and from the true x_t.

For the first ``--limit`` cases of a prepared datalist (use the validation fold to choose anything),
one T-step posterior chain of the inference config's model is run as ``ResidualShiftInferer``
samples it, and at every step t the lungs PSNR is recorded of

- the chain's x0 prediction f(x_t, y0, t) and of its x_t (what the sampler does with it),
- the x0 prediction from the true x_t ~ q(x_t | x0, y0) (ResShift Eq. 2; what training showed it),

beside identity and the mean prediction (unsmoothed: this is about the network). A sampler whose
chain x0 falls away from the true-x_t one is leaving the distribution it was trained on
(docs/README.md, "Why the chain drifted").

    python scripts/trace_chain.py --prepared data/seed2/prepared --datalist data/seed2/prepared/val_fold0.json \\
        --out runs/trace --limit 2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.io import write_json  # noqa: E402
from custom.metrics import masked_psnr  # noqa: E402
from scripts.evaluate_heldout import case_context, common_arguments, datalist_entries, load_case, whole_chain_model  # noqa: E402


def trace_case(network, inferer, case: dict, context: torch.Tensor | None, seed: int) -> dict:
    """Lungs PSNR of identity, the mean prediction and, per step (T-1 .. 0), the chain's and the true x_t's x0.

    Args:
        network: the denoiser.
        inferer: the ``ResidualShiftInferer`` of the inference config.
        case: ``load_case``'s arrays of one case.
        context: its text features (1, L, D) or ``None``.
        seed: seed of the chain's noise and of the true x_t's.
    """
    scheduler = inferer.scheduler
    y0, x0 = torch.as_tensor(case["image"])[None], torch.as_tensor(case["target"])[None]
    lungs, region = torch.as_tensor(case["lungs"])[None] > 0, torch.as_tensor(case["mask"])[None] > 0
    weeks = torch.tensor([float(case["weeks"])])

    def psnr(pred: torch.Tensor) -> float:
        return float(masked_psnr(pred * region, x0, lungs))

    generator = torch.Generator().manual_seed(seed)
    row = {"patient": case["patient"], "identity": psnr(y0), "chain_x0": [], "chain_xt": [], "true_x0": []}

    def record(t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        row["chain_x0"].append(psnr(x0_pred))
        row["chain_xt"].append(psnr(x_t))
        true_x_t = scheduler.add_noise(x0, y0, torch.randn(x0.shape, generator=generator), torch.tensor([t]))
        row["true_x0"].append(psnr(inferer.denoise(network, inferer.model_input(true_x_t, t), y0, t, context, weeks)))

    with torch.inference_mode():
        row["mean"] = psnr(inferer.predict_mean(y0, network, context, weeks))
        row["sample"] = psnr(inferer.sample_one(network, y0, context, generator, weeks, on_step=record))
    return row


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the chains and of the true x_t")
    args = parser.parse_args()
    network, inferer, text_encoder = whole_chain_model(args)
    rows = []
    for entry in datalist_entries(args):
        case = load_case(entry)
        context = case_context(text_encoder, case)
        rows.append(trace_case(network, inferer, case, context, args.seed))
        print(json.dumps({k: rows[-1][k] for k in ("patient", "identity", "mean", "sample")}), flush=True)
    steps = inferer.scheduler.timesteps.tolist()
    mean_of = {key: np.mean([r[key] for r in rows], axis=0) for key in ("chain_x0", "chain_xt", "true_x0")}
    overall = {key: float(np.mean([r[key] for r in rows])) for key in ("identity", "mean", "sample")}
    lines = [f"{len(rows)} cases; lungs PSNR (dB), mean over cases; identity {overall['identity']:.2f}, "
             f"mean prediction {overall['mean']:.2f}, one sample {overall['sample']:.2f}",
             "", "| t | chain x0 | chain x_t | x0 from the true x_t |", "|---|---|---|---|"]
    lines += [f"| {t + 1} | {mean_of['chain_x0'][i]:.2f} | {mean_of['chain_xt'][i]:.2f} | {mean_of['true_x0'][i]:.2f} |"
              for i, t in enumerate(steps)]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "trace.json", {"cases": rows, "steps": [t + 1 for t in steps]})


if __name__ == "__main__":
    main()
