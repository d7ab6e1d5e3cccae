"""Where should a sample stop? The x0 prediction at every reverse step, scored with a proper score on validation.

For the first ``--limit`` cases of a prepared datalist (use the validation fold to choose), N
posterior chains (seeds ``--seed`` .. ``--seed`` + N - 1) of the inference config's model are run
as ``ResidualShiftInferer`` samples, and at every step t the network's x0 prediction f(x_t, y0, t),
which a chain stopped at t returns (``sample_output_step``, a denoised sample), is scored against the
real follow-up:

- one sample: lungs and new-lesion PSNR, averaged over the N chains, as a gain over identity;
- the mean of the N samples, and the mean of 8 estimated from it (the samples' voxel variance v
  moves the squared error of a mean of n by v / n: MSE_8 = MSE_N - v / N + v / 8);
- the fair ensemble CRPS of the N samples in the lungs (``custom.metrics.masked_ensemble_crps``), a
  proper score that rewards sharp samples only as far as they are calibrated; the mean prediction
  is scored as a one-member ensemble (its absolute error).

Every chain runs to t = 1 whatever the weights' ``sample_output_step``, and everything is unsmoothed
(this is about the chain; the inferer smooths the mean of samples it returns). The step with the
lowest CRPS, averaged over the cases, is printed as the choice.

    python scripts/sweep_sample_step.py --prepared data/seed2/prepared --out runs/sample_step --limit 4 --chains 3
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.constants import HU_WINDOW  # noqa: E402
from custom.io import write_json  # noqa: E402
from custom.metrics import masked_ensemble_crps  # noqa: E402
from scripts.evaluate_heldout import case_context, common_arguments, datalist_entries, load_case, whole_chain_model  # noqa: E402


def mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean squared error inside ``mask``; NaN for an empty mask (a patient without new lesions)."""
    return float(((prediction - target) ** 2)[mask].mean()) if bool(mask.any()) else float("nan")


def sweep_case(network, inferer, case: dict, context: torch.Tensor | None, chains: int, seed: int) -> dict:
    """Squared errors and CRPS of identity, the mean prediction and, per step (T .. 1), the chains' x0 predictions.

    Args:
        network: the denoiser.
        inferer: the ``ResidualShiftInferer`` of the inference config.
        case: ``load_case``'s arrays of one case.
        context: its text features (1, L, D) or ``None``.
        chains: samples per case.
        seed: seed of the first chain's noise (chain c uses seed + c).
    """
    y0, x0 = torch.as_tensor(case["image"])[None], torch.as_tensor(case["target"])[None]
    region = (torch.as_tensor(case["mask"])[None] > 0).float()
    lungs, new = torch.as_tensor(case["lungs"])[None] > 0, torch.as_tensor(case["new_lesions"])[None] > 0
    weeks = torch.tensor([float(case["weeks"])])
    with torch.inference_mode():
        mean = inferer.predict_mean(y0, network, context, weeks) * region
        x0_predictions: list[list[torch.Tensor]] = [[] for _ in range(chains)]
        for c in range(chains):
            inferer.sample_one(network, y0, context, torch.Generator().manual_seed(seed + c), weeks,
                               on_step=lambda t, x_t, out, c=c: x0_predictions[c].append(out * region))
    row = {"patient": case["patient"], "steps": [t + 1 for t in inferer.scheduler.timesteps.tolist()],
           "identity": mse(y0, x0, lungs), "identity_new": mse(y0, x0, new),
           "mean": mse(mean, x0, lungs), "mean_new": mse(mean, x0, new),
           "crps_identity": masked_ensemble_crps(y0[None], x0[0], lungs[0]),
           "crps_mean": masked_ensemble_crps(mean[None], x0[0], lungs[0]), "per_step": []}
    for step in range(len(row["steps"])):
        samples = torch.stack([x0_predictions[c][step] for c in range(chains)])
        average, variance = samples.mean(0), samples.var(0, unbiased=True)
        row["per_step"].append({
            "one": [mse(s, x0, lungs) for s in samples], "one_new": [mse(s, x0, new) for s in samples],
            "average": mse(average, x0, lungs), "average_new": mse(average, x0, new),
            "variance": float(variance[lungs].mean()),
            "variance_new": float(variance[new].mean()) if bool(new.any()) else float("nan"),
            "crps": masked_ensemble_crps(samples, x0[0], lungs[0]),
        })
    return row


def step_gain(rows: list[dict], step: int, estimate: str, chains: int, region: str = "") -> float:
    """Mean over cases of an estimate's PSNR gain over identity (dB) at one step.

    Args:
        rows: ``sweep_case`` results.
        step: index into ``per_step``.
        estimate: ``"one"`` (one sample, averaged over the chains), ``"average"`` (the mean of the chains)
            or ``"eight"`` (the mean of 8, from the mean of the chains and their variance).
        chains: samples per case.
        region: ``""`` for the lungs, ``"_new"`` for the new lesions.
    """
    gains = []
    for r in rows:
        s = r["per_step"][step]
        value = {"one": float(np.mean(s[f"one{region}"])), "average": s[f"average{region}"],
                 "eight": s[f"average{region}"] + s[f"variance{region}"] * (1 / 8 - 1 / chains)}[estimate]
        gains.append(10.0 * np.log10(r[f"identity{region}"] / value))
    return float(np.nanmean(gains))


def summarize(rows: list[dict], chains: int) -> tuple[list[dict], int]:
    """Per step the mean over cases of each score (gains in dB over identity), and the step of lowest CRPS."""
    table = [{"step": step, "one": step_gain(rows, i, "one", chains),
              f"mean_of_{chains}": step_gain(rows, i, "average", chains),
              "mean_of_8_estimated": step_gain(rows, i, "eight", chains),
              "one_new": step_gain(rows, i, "one", chains, "_new"),
              "mean_of_8_estimated_new": step_gain(rows, i, "eight", chains, "_new"),
              "crps": float(np.mean([r["per_step"][i]["crps"] for r in rows]))}
             for i, step in enumerate(rows[0]["steps"])]
    return table, min(table, key=lambda row: row["crps"])["step"]


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--chains", type=int, default=3, help="samples per case")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first chain")
    args = parser.parse_args()
    network, inferer, text_encoder = whole_chain_model(args)
    rows = []
    for entry in datalist_entries(args):
        case = load_case(entry)
        context = case_context(text_encoder, case)
        rows.append(sweep_case(network, inferer, case, context, args.chains, args.seed))
        print(json.dumps({"patient": case["patient"], "identity_db": -10 * np.log10(rows[-1]["identity"]),
                          "mean_db": -10 * np.log10(rows[-1]["mean"])}), flush=True)
    table, best = summarize(rows, args.chains)
    mean_gain = float(np.mean([10 * np.log10(r["identity"] / r["mean"]) for r in rows]))
    hu_per_unit = HU_WINDOW[1] - HU_WINDOW[0]  # the CRPS is in [0, 1] image units
    crps = {name: hu_per_unit * float(np.mean([r[f"crps_{name}"] for r in rows])) for name in ("identity", "mean")}
    lines = [f"{len(rows)} cases x {args.chains} chains; gains in dB over identity, mean over cases; the mean "
             f"prediction (unsmoothed) {mean_gain:+.2f} dB, lungs CRPS {crps['mean']:.2f} HU (identity "
             f"{crps['identity']:.2f})", "",
             f"| t | one sample | mean of {args.chains} | mean of 8 (est.) | new lesions: one | mean of 8 (est.) "
             "| lungs CRPS (HU) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['one']:+.2f} | {r[f'mean_of_{args.chains}']:+.2f} | {r['mean_of_8_estimated']:+.2f} "
              f"| {r['one_new']:+.2f} | {r['mean_of_8_estimated_new']:+.2f} | {hu_per_unit * r['crps']:.2f} |"
              for r in table]
    lines += ["", f"lowest CRPS: sample_output_step {best}"]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(args.out / "sample_step.json", {"cases": rows, "table": table, "lowest_crps_step": best})


if __name__ == "__main__":
    main()
