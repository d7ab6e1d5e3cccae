"""Benchmark and accuracy figures of target-region pre-registration on the synthetic cohort.

    python scripts/benchmark_prepare.py --work /tmp/bench [--pairs 6] [--full-size 1] [--out bench.json]

Reports, on this machine:
- seconds per pair (segmentation of both scans, registration, total) on the demo grid (96^3, demo
  chests) and on the paper's 512 x 512 x 256 grid (adult chests, body_scale 1.0);
- registration error: mean displacement of the initial lung voxels, ground-truth vs estimated
  per-lung transform (transforms.json), in mm;
- threshold segmentation Dice against the ground-truth lung labels, and the share of ground-truth
  lesion voxels (per lesion type) inside the dilated region;
- fixed window vs min-max normalisation: how steady the lung parenchyma's normalised intensity is
  across patients and between the two scans of a patient.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.constants import LESION_LABELS, LUNG_LABELS, REGION_MARGIN_MM  # noqa: E402
from custom.geometry import normalize_hu, voxel_spacing  # noqa: E402
from custom.io import load_ct  # noqa: E402
from custom.preregistration import PairPreparer, preparation_chain  # noqa: E402
from custom.segmentation import check_totalsegmentator, dilate_mm, segment_lungs  # noqa: E402
from custom.synthetic import generate_cohort  # noqa: E402

MARGIN_MM = REGION_MARGIN_MM
"""The pipeline's dilation of the lungs (``configs/prepare.json``)."""


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def totalsegmentator_status() -> str:
    """'available', or why the TotalSegmentator column is empty."""
    try:
        check_totalsegmentator(fast=True)
    except RuntimeError as e:
        missing = "weights" if "weights missing" in str(e) else "package"
        return f"not available ({missing} not installed)"
    return "available"


def registration_error(folder: Path, qc: dict) -> dict[str, float]:
    """Mean displacement error (mm) of each initial lung's voxels, ground truth vs estimate."""
    affine = nib.load(folder / "initial.nii.gz").affine
    truth_labels = labels_of(folder / "initial_lungs.nii.gz")
    truth = json.loads((folder / "transforms.json").read_text(encoding="utf-8"))
    errors = {}
    for name, lab in LUNG_LABELS.items():
        points = np.stack(np.nonzero(truth_labels == lab), 1) @ affine[:3, :3].T + affine[:3, 3]
        t, e = np.asarray(truth[f"{name}_lung"]), np.asarray(qc["transforms"][f"{name}_lung"])
        true_points, estimated = points @ t[:3, :3].T + t[:3, 3], points @ e[:3, :3].T + e[:3, 3]
        errors[name] = float(np.linalg.norm(true_points - estimated, axis=1).mean())
        errors[f"{name}_identity"] = float(np.linalg.norm((points @ t[:3, :3].T + t[:3, 3]) - points, axis=1).mean())
    return errors


def segmentation_scores(folder: Path) -> dict[str, float]:
    """Threshold Dice per lung and lesion coverage of the dilated region, initial scan."""
    hu, affine = load_ct(folder / "initial.nii.gz")
    labels = segment_lungs(hu, affine, "threshold")
    truth, lesions = labels_of(folder / "initial_lungs.nii.gz"), labels_of(folder / "initial_lesions.nii.gz")
    scores = {f"dice_{n}": float(2 * ((labels == v) & (truth == v)).sum() / ((labels == v).sum() + (truth == v).sum()))
              for n, v in LUNG_LABELS.items()}
    region = dilate_mm(labels > 0, MARGIN_MM, voxel_spacing(affine))
    for name, value in LESION_LABELS.items():
        if (lesions == value).any():
            scores[f"lesion_{name}"] = float(region[lesions == value].mean())
    scores["lesion_all"] = float(region[lesions > 0].mean()) if (lesions > 0).any() else 1.0
    return scores


def parenchyma_means(folder: Path) -> dict[str, list[float]]:
    """Mean normalised intensity of lesion-free lung parenchyma in both scans, per normalisation mode.

    Min-max uses the range inside the dilated lung region, as the pipeline does.
    """
    out: dict[str, list[float]] = {"window": [], "minmax": []}
    for scan in ("initial", "followup"):
        hu, affine = load_ct(folder / f"{scan}.nii.gz")
        lungs = labels_of(folder / f"{scan}_lungs.nii.gz") > 0
        lesions = labels_of(folder / f"{scan}_lesions.nii.gz") > 0
        parenchyma = lungs & ~lesions & (hu < -500)
        region = dilate_mm(lungs, MARGIN_MM, voxel_spacing(affine))
        for mode in out:
            out[mode].append(float(normalize_hu(hu, mode, region=region)[parenchyma].mean()))
    return out


def time_pairs(cohort: Path, patients: list[str], grid: tuple[int, int, int], work: Path) -> list[dict]:
    """Prepare each pair on ``grid``; returns its QC record (with seconds per step)."""
    preparer = PairPreparer(preparation_chain(grid={"size": list(grid), "spacing_mm": 1.0}))
    records = []
    for patient in patients:
        folder = cohort / patient
        qc = preparer(folder / "initial.nii.gz", folder / "followup.nii.gz",
                      work / f"{patient}_{'x'.join(map(str, grid))}")
        qc["error_mm"] = registration_error(folder, qc)
        records.append(qc)
        print(f"{patient} grid {grid}: {qc['seconds']} error {qc['error_mm']}", flush=True)
    return records


def summary_of(records: list[dict]) -> dict[str, float]:
    seconds = [r["seconds"] for r in records]
    return {"segmentation_s": float(np.mean([s["SegmentLungsd"] for s in seconds])),
            "registration_s": float(np.mean([s["RegisterLungsd"] for s in seconds])),
            "total_s": float(np.mean([s["total"] for s in seconds]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--pairs", type=int, default=6, help="demo-size pairs")
    parser.add_argument("--full-size", type=int, default=1, help="adult-size pairs on the 512 x 512 x 256 grid")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cirresdiff_bench_") as tmp:
        work = args.work or Path(tmp)
        demo, adult = work / "demo_cohort", work / "adult_cohort"
        generate_cohort(demo, args.pairs, args.seed)
        patients = sorted(p.name for p in demo.iterdir() if (p / "transforms.json").is_file())
        results: dict = {"totalsegmentator": totalsegmentator_status()}
        demo_records = time_pairs(demo, patients, (96, 96, 96), work / "prepared")
        results["demo_grid"] = summary_of(demo_records)
        errors = [r["error_mm"][n] for r in demo_records for n in LUNG_LABELS]
        identity = [r["error_mm"][f"{n}_identity"] for r in demo_records for n in LUNG_LABELS]
        results["registration_error_mm"] = {"mean": float(np.mean(errors)), "max": float(np.max(errors)),
                                            "without_registration": float(np.mean(identity))}
        scores = [segmentation_scores(demo / p) for p in patients]
        results["segmentation"] = {k: {"mean": float(np.mean([s[k] for s in scores if k in s])),
                                       "min": float(np.min([s[k] for s in scores if k in s]))}
                                   for k in sorted({k for s in scores for k in s})}
        means = [parenchyma_means(demo / p) for p in patients]
        results["normalisation"] = {
            mode: {"parenchyma_mean": float(np.mean([m[mode] for m in means])),
                   "across_patients_sd": float(np.std([m[mode][0] for m in means], ddof=1)),
                   "initial_vs_followup_abs_diff": float(np.mean([abs(m[mode][0] - m[mode][1]) for m in means]))}
            for mode in ("window", "minmax")}
        if args.full_size:
            start = time.perf_counter()
            generate_cohort(adult, args.full_size, args.seed, body_scale=1.0)
            results["adult_generation_s"] = time.perf_counter() - start
            adult_patients = sorted(p.name for p in adult.iterdir() if (p / "transforms.json").is_file())
            adult_records = time_pairs(adult, adult_patients, (512, 512, 256), work / "prepared")
            results["full_grid"] = summary_of(adult_records)
            results["full_grid"]["shape"] = [r["grid"] for r in adult_records]
            results["full_grid"]["source_shape"] = [list(load_ct(adult / p / "initial.nii.gz")[0].shape)
                                                    for p in adult_patients]
            results["full_grid"]["error_mm"] = [r["error_mm"] for r in adult_records]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
