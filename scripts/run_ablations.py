"""The paper's Table 1: the four ablations over the five cross-validation folds, plus the identity baseline.

For every fold k (validation fold = k) and every ablation, trains with ``configs/train.json`` plus
the ablation's override files, evaluates on the test split with ``configs/evaluate.json``, and
collects the summaries into ``<out>/table1.md`` (mean +/- std over folds) with a bar chart.

    python scripts/run_ablations.py --out runs/ablations --folds 0 1 2 3 4

Settings for a quick run go through ``--override key=value`` (config ids, JSON values), e.g.
``--override max_epochs=40 --override "roi_size=[48,48,48]"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cirresdiff_bundle.cli import ABLATIONS  # noqa: E402
from cirresdiff_bundle.runner import run_config  # noqa: E402

METRICS = ("psnr_lung", "ssim_lung", "psnr_change", "ssim_change")


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` strings as config overrides, values parsed as JSON when they can be."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_one(name: str, fold: int, out: Path, overrides: dict) -> dict:
    """Train and evaluate one ablation on one fold; returns its evaluation summary."""
    run_dir = out / name / f"fold{fold}"
    summary_path = run_dir / "evaluate" / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    paths = {"output_dir": str(run_dir / "train"), "model_path": str(run_dir / "model.pt"), "val_fold": fold}
    configs = ["train", *ABLATIONS[name]]
    run_config(configs, run_id="run", **{**overrides, **paths})
    run_config([*configs, "evaluate"], run_id="run", method_name=name,
               **{**overrides, **paths, "output_dir": str(run_dir / "evaluate")})
    return json.loads(summary_path.read_text(encoding="utf-8"))


def table(results: dict[str, list[dict]]) -> str:
    """Markdown table: rows are the identity baseline and the ablations, cells mean +/- std over folds."""
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    # The identity baseline does not depend on the ablation: take it from the first one's folds.
    rows = {"identity (follow-up = initial)": [s["identity"] for s in next(iter(results.values()))]}
    rows.update({name: [s["model"] for s in summaries] for name, summaries in results.items()})
    for name, per_fold in rows.items():
        cells = []
        for metric in METRICS:
            values = np.array([f[metric]["mean"] for f in per_fold], dtype=float)
            cells.append(f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, list[dict]], path: Path) -> None:
    """PSNR and SSIM in the change region per method, with the identity baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
    for ax, metric in zip(axes, ("psnr_change", "ssim_change")):
        means = [np.nanmean([s["model"][metric]["mean"] for s in results[n]]) for n in names]
        stds = [np.nanstd([s["model"][metric]["mean"] for s in results[n]]) for n in names]
        ax.bar(names, means, yerr=stds, color=["#9ab", "#79a", "#c97", "#b53"][: len(names)], capsize=4)
        identity = np.nanmean([s["identity"][metric]["mean"] for s in next(iter(results.values()))])
        ax.axhline(identity, color="k", linestyle="--", label="identity baseline")
        ax.set_title(metric.replace("_", " in ").replace("psnr", "PSNR").replace("ssim", "SSIM"))
        ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--override", action="append", default=[], help="config id=value (JSON value)")
    args = parser.parse_args()
    overrides = parse_overrides(args.override)
    results = {name: [run_one(name, fold, args.out, overrides) for fold in args.folds] for name in args.ablations}
    args.out.mkdir(parents=True, exist_ok=True)
    header = f"Test split, {len(args.folds)} fold(s) {args.folds}; mean ± std over folds of the per-fold means.\n\n"
    (args.out / "table1.md").write_text(header + table(results), encoding="utf-8")
    bar_chart(results, args.out / "table1.png")
    print(header + table(results))
    print(f"wrote {args.out / 'table1.md'} and {args.out / 'table1.png'}")


if __name__ == "__main__":
    main()
