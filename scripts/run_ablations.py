"""The paper's Table 1: the four ablations over the five cross-validation folds, with the reference rows.

One command does everything at demo scale (``cirresdiff_bundle.demo.DEMO_SETTINGS``): the demo's
synthetic cohort (24 adult chests, seed 0) and its preparation on the 4 mm grid, the CLIP text
encoder (pre-trained once, on the training patients, shared by the CIP rows), then for every fold
k (validation fold = k, the other folds train) and every ablation: training with
``configs/train.json`` plus the ablation's override files (``configs/ablations/table.json``) and
evaluation on the fixed test split with ``configs/evaluate.json``. Every step is skipped when its
output exists, so an interrupted run resumes where it stopped.

    python scripts/run_ablations.py --out runs/ablations

writes ``<out>/table1.md`` and ``table1.png``. Rows: identity (follow-up := initial), the
smoothed initial scan, DM, DM-CIP, DM-R, DM-R-CIP; cells: mean +/- SD over folds of each fold's
test mean, lungs and disease-change regions (``custom.evaluation``); a second table has the
paired difference of every row against DM-R-CIP over the folds with its 95 % t interval. Settings
go through ``--override key=value`` (config ids, JSON values), e.g. ``--override max_epochs=40``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cirresdiff_bundle.cli import ABLATIONS  # noqa: E402
from cirresdiff_bundle.demo import DEMO_SETTINGS, UNGATED, weights_to_evaluate  # noqa: E402
from cirresdiff_bundle.runner import run_config  # noqa: E402
from custom.evaluation import format_difference, paired_difference  # noqa: E402
from custom.io import atomic_write_bytes, write_png  # noqa: E402

METRICS = ("psnr_lungs", "ssim_lungs", "psnr_change", "ssim_change")
REFERENCE = "DM-R-CIP"
REFERENCE_ROWS = {"identity": "identity (follow-up := initial)", "smoothed": "smoothed initial scan"}


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


def prepare_data(data: Path, models: Path) -> dict:
    """The demo's cohort, its preparation and the CLIP text encoder, each made once; returns the paths overrides.

    Args:
        data: folder of the cohort (``cohort/``) and the prepared pairs (``prepared/``).
        models: folder of the shared text encoder (``text_encoder/``).
    """
    from custom.synthetic import generate_cohort

    cohort, prepared = data / "cohort", data / "prepared"
    if not (cohort / "datalist.json").is_file():
        generate_cohort(cohort, **DEMO_SETTINGS["cohort"])
    paths = {"dataset_dir": str(prepared), "cohort_dir": str(cohort), "ckpt_dir": str(models)}
    if not (prepared / "datalist.json").is_file():
        run_config(["prepare"], cohort_dir=str(cohort), prepared_dir=str(prepared), **DEMO_SETTINGS["prepare"])
    if not (models / "text_encoder").is_dir():
        run_config(["pretrain_clip"], output_dir=str(models.parent / "pretrain_clip"), **paths,
                   **DEMO_SETTINGS["pretrain_clip"])
    return paths


def run_one(name: str, fold: int, out: Path, settings: dict) -> dict:
    """Train and evaluate one ablation on one fold; returns its evaluation summary.

    Args:
        name: the ablation (a key of ``ABLATIONS``).
        fold: the validation fold.
        out: the table's output folder.
        settings: config overrides of every run (paths and training settings).
    """
    run_dir = out / name / f"fold{fold}"
    summary_path = run_dir / "evaluate" / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    train = {**settings, "output_dir": str(run_dir / "train"), "model_path": str(run_dir / "model.pt"),
             "val_fold": fold}
    configs = ["train", *ABLATIONS[name]]
    print(f"=== {name}, validation fold {fold}", flush=True)
    if not (run_dir / "train" / "final.txt").is_file():
        run_config(configs, run_id="run", **train)
        atomic_write_bytes(run_dir / "train" / "final.txt", b"training finished\n")
    gated = weights_to_evaluate(run_dir / "train", run_dir / "model.pt")
    run_config([*configs, "evaluate"], run_id="run", **{**train, "output_dir": str(run_dir / "evaluate"),
                                                       "method_name": name if gated else UNGATED.format(name)})
    return json.loads(summary_path.read_text(encoding="utf-8"))


def beat_identity(out: Path, name: str, fold: int) -> bool:
    """Whether the run's validated model passed the training gate (beat identity on its validation fold)."""
    return not (out / name / f"fold{fold}" / "train" / "model_not_written.txt").is_file()


def fold_means(summaries: list[dict], method: str, metric: str) -> np.ndarray:
    """Per-fold test means of one metric of one method (``model`` or a reference row) of a summary."""
    return np.array([s[method][metric]["mean"] for s in summaries], dtype=float)


def rows(results: dict[str, list[dict]], ungated: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
    """Every row's per-fold means: the reference rows (from the first ablation, they do not depend on it), then
    the ablations, each labelled with the number of folds whose model did not beat identity on validation."""
    first = next(iter(results.values()))
    out = {label: {m: fold_means(first, key, m) for m in METRICS} for key, label in REFERENCE_ROWS.items()}
    for name, summaries in results.items():
        failed = ungated[name]
        label = name if not failed else f"{name} ({failed} of {len(summaries)} folds did not beat identity)"
        out[label] = {m: fold_means(summaries, "model", m) for m in METRICS}
    return out


def table(per_row: dict[str, dict[str, np.ndarray]]) -> str:
    """Markdown: mean +/- SD over folds per row, then each row's paired difference to DM-R-CIP (95 % t CI)."""
    header = "| method | " + " | ".join(METRICS) + " |\n" + "|---" * (len(METRICS) + 1) + "|\n"
    lines = ["mean ± SD over folds of the per-fold test means", "", header.rstrip("\n")]
    for label, values in per_row.items():
        lines.append(f"| {label} | " + " | ".join(f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}"
                                                  for v in values.values()) + " |")
    reference = next((v for label, v in per_row.items() if label.startswith(REFERENCE)), None)
    if reference is not None:
        lines += ["", f"paired difference to {REFERENCE} over folds, mean [95 % CI]", "", header.rstrip("\n")]
        for label, values in per_row.items():
            if label.startswith(REFERENCE):
                continue
            cells = []
            for metric in METRICS:
                d = paired_difference(values[metric], reference[metric])
                cells.append(format_difference(d))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(per_row: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """PSNR in the lungs and in the change region per row (mean and SD over folds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label.split(" (")[0] for label in per_row]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for ax, metric in zip(axes, ("psnr_lungs", "psnr_change")):
        means = [np.mean(v[metric]) for v in per_row.values()]
        sds = [np.std(v[metric], ddof=1) for v in per_row.values()]
        ax.bar(labels, means, yerr=sds, color=["#bbb", "#999", "#9ab", "#79a", "#c97", "#b53"][: len(labels)],
               capsize=4)
        low = min(means) - 2.0
        ax.set_ylim(low, max(means) + 1.0)
        ax.set_title(metric.replace("psnr_", "PSNR (dB), ").replace("change", "disease-change region"))
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    write_png(path, fig, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--data", type=Path, default=None, help="cohort and prepared data (default <out>/data)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--override", action="append", default=[], help="config id=value (JSON value)")
    args = parser.parse_args()
    out = args.out.resolve()
    paths = prepare_data((args.data or out / "data").resolve(), out / "models")
    settings = {**DEMO_SETTINGS["train"], **parse_overrides(args.override), **paths}
    results: dict[str, list[dict]] = {name: [] for name in args.ablations}
    # fold by fold, so that a run stopped early has whole folds: `--folds 0 1` then tabulates them
    for fold in args.folds:
        for name in args.ablations:
            results[name].append(run_one(name, fold, out, settings))
    ungated = {name: sum(not beat_identity(out, name, fold) for fold in args.folds) for name in args.ablations}
    per_row = rows(results, ungated)
    cases = next(iter(results.values()))[0]["cases"]
    header = (f"Table 1 at demo scale: {cases} test patients, {len(args.folds)} fold(s) {args.folds} (each trains "
              f"on the other folds); training settings {json.dumps(settings | {k: '...' for k in paths})}.\n\n")
    atomic_write_bytes(out / "table1.md", (header + table(per_row)).encode("utf-8"))
    bar_chart(per_row, out / "table1.png")
    print(header + table(per_row))
    print(f"wrote {out / 'table1.md'} and {out / 'table1.png'}")


if __name__ == "__main__":
    main()
