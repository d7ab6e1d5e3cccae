"""Time an adult-size case end to end on this machine; writes a section of docs/benchmarks.md.

Per patient of ``generate_cohort``'s adult default (512 x 512 matrix, 1-2.5 mm slices): the
generation of the pair, its preparation step by step (loading, lung segmentation of both scans,
dilation, per-lung registration, resampling to the model grid) and the prediction from the raw
initial CT with ``predict_followup`` (mean prediction, the default), plus for the first patient one
posterior sample as shipped (the chain stopped at ``sample_output_step``) and one of the whole 15-step
chain. Targets (issue "Adult-size chests end to end"): preparation of a pair <= 60 s, mean prediction
of a case <= 60 s, on 2 CPU cores.

    python scripts/benchmark_adult.py --patients 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cirresdiff_bundle import predict_followup  # noqa: E402
from cirresdiff_bundle.cli import root_cause  # noqa: E402
from custom.grid import GRIDS  # noqa: E402
from custom.preregistration import PairPreparer  # noqa: E402
from custom.synthetic import generate_patient, patient_rng, sample_patient  # noqa: E402

SECTION = "### Adult case end to end (CPU)"


def time_patient(index: int, seed: int, work: Path, sample: bool) -> dict:
    """Generate, prepare and predict one adult patient; returns seconds per step and the scan geometry."""
    rng = patient_rng(seed, index)
    patient = sample_patient(f"ADULT{index:02d}", rng)
    folder = work / patient.patient_id
    start = time.perf_counter()
    stats = generate_patient(patient, rng, folder, 1.0)
    row = {"patient": patient.patient_id, "shape": stats["shape"], "spacing": stats["spacing"],
           "lung_ml": round(stats["lung_ml"]), "generation": time.perf_counter() - start}
    qc = PairPreparer()(folder / "initial.nii.gz", folder / "followup.nii.gz", work / "prepared" / patient.patient_id)
    row["preparation"] = qc["seconds"]
    record = {"FVC": patient.fvc, "Percent": patient.percent, "Age": patient.age, "Sex": patient.sex,
              "SmokingStatus": patient.smoking}
    start = time.perf_counter()
    result = predict_followup(folder / "initial.nii.gz", record, output_dir=work / "mean")[0]
    row["mean_prediction"] = time.perf_counter() - start
    row["lungs_inside_grid"] = result["summary"]["coverage"]["lungs_inside_grid"]
    if sample:
        for name, overrides in (("sample_shipped", {}), ("sample_15_steps", {"sample_output_step": 1})):
            start = time.perf_counter()
            predict_followup(folder / "initial.nii.gz", record, output_dir=work / name, prediction="sample",
                             **overrides)
            row[name] = time.perf_counter() - start
        row["reshaped"] = [reshaped_case(folder / "initial.nii.gz", record, work, stretch)
                           for stretch in RESHAPED_STRETCHES]
    shutil.rmtree(folder)
    return row


RESHAPED_STRETCHES = ((0.9, 1.25, 1.1), (1.45, 1.0, 1.0))
"""Chests of other shapes made from a generated one: deeper and taller; 45 % wider (lungs ~380 mm: too wide)."""


def reshaped_case(initial: Path, record: dict, work: Path, stretch: tuple[float, float, float]) -> dict:
    """A CT of a different shape and geometry: the scan stretched per axis about its centre and resampled
    to 0.55 x 0.55 x 3 mm voxels; predicted, or refused with the grid message."""
    import nibabel as nib
    from scipy import ndimage

    image = nib.load(str(initial))
    hu, affine = np.asarray(image.dataobj, dtype=np.float32), image.affine
    spacing = np.array([0.55, 0.55, 3.0])
    centre = affine[:3, :3] @ ((np.array(hu.shape) - 1) / 2.0) + affine[:3, 3]
    extent = np.abs(np.diag(affine)[:3]) * np.array(hu.shape) * np.asarray(stretch)
    shape = tuple(int(n) for n in np.ceil(extent / spacing))
    target = np.diag([*spacing, 1.0])
    target[:3, 3] = centre - (np.array(shape) - 1) / 2.0 * spacing
    # output voxel -> world -> undo the stretch about the centre -> source voxel
    unstretch = np.eye(4)
    unstretch[:3, :3] = np.diag(1.0 / np.asarray(stretch))
    unstretch[:3, 3] = centre - unstretch[:3, :3] @ centre
    mapping = np.linalg.inv(affine) @ unstretch @ target
    out = ndimage.affine_transform(hu, mapping[:3, :3], offset=mapping[:3, 3], output_shape=shape, order=1,
                                   cval=-1000.0)
    path = work / f"reshaped_{'x'.join(f'{v:g}' for v in stretch)}.nii.gz"
    nib.save(nib.Nifti1Image(out.astype(np.int16), target), str(path))
    start = time.perf_counter()
    try:
        summary = predict_followup(path, record, output_dir=work / "reshaped")[0]["summary"]
        outcome = f"predicted, {100 * summary['coverage']['lungs_inside_grid']:.1f} % of the lungs in the grid"
    except Exception as error:  # the refusal is an outcome to report, not a failure of the benchmark
        outcome = f"refused: {root_cause(error)}"
    return {"stretch": list(stretch), "shape": list(shape), "spacing": spacing.tolist(), "outcome": outcome,
            "seconds": time.perf_counter() - start}


def report(rows: list[dict], machine: str, load: str) -> str:
    """The markdown section: one row per patient, then the targets."""
    steps = ["LoadCTd", "SegmentLungsd", "DilateMaskd", "RegisterLungsd", "ResampleToGridd", "total"]
    lines = [SECTION, "",
             f"Produced by `scripts/benchmark_adult.py` ({machine}; {load}). Adult chests of the synthetic "
             f"cohort's default geometry; model grid `adult` ({GRIDS['adult'].describe()}); the shipped "
             "network; prediction = `predict_followup` from the raw initial CT (segmentation, resampling, "
             "network, mapping back, writing).", "",
             "| patient | scan (voxels, mm) | lungs ml | generation s | " + " | ".join(f"prep: {s} s" for s in steps)
             + " | mean prediction s | lungs in grid |", "| --- " * (6 + len(steps)) + "|"]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) + " @ " + "x".join(f"{v:g}" for v in r["spacing"])
        prep = " | ".join(f"{r['preparation'].get(s, 0.0):.1f}" for s in steps)
        lines.append(f"| {r['patient']} | {shape} | {r['lung_ml']} | {r['generation']:.1f} | {prep} | "
                     f"{r['mean_prediction']:.1f} | {100 * r['lungs_inside_grid']:.1f} % |")
    prep_total = [r["preparation"]["total"] for r in rows]
    mean_pred = [r["mean_prediction"] for r in rows]
    lines += ["", f"Preparation of a pair: mean {np.mean(prep_total):.1f} s, worst {max(prep_total):.1f} s "
              f"(target <= 60 s). Mean prediction of a case: mean {np.mean(mean_pred):.1f} s, worst "
              f"{max(mean_pred):.1f} s (target <= 60 s)."]
    sampled = [r for r in rows if "sample_15_steps" in r]
    if sampled:
        first = sampled[0]
        lines.append(f"One posterior sample of {first['patient']}: {first['sample_shipped']:.1f} s as shipped "
                     f"(denoised, the chain stopped at its sample_output_step), {first['sample_15_steps']:.1f} s "
                     f"for the whole 15-step chain (against {first['mean_prediction']:.1f} s for its mean "
                     "prediction).")
        for case in first.get("reshaped", []):
            lines.append(f"Constructed CT, {first['patient']} stretched {case['stretch']} and resampled to "
                         f"{'x'.join(map(str, case['shape']))} voxels of {'x'.join(f'{v:g}' for v in case['spacing'])} "
                         f"mm: {case['outcome']} ({case['seconds']:.1f} s).")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    lines += [f"Peak memory of the benchmark process (max RSS): {peak:.1f} GB.", ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace (or append) this script's section of the benchmarks page."""
    text = path.read_text(encoding="utf-8")
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        cut = [i for i in (rest.find("\n### "), rest.find("\n## ")) if i >= 0]
        tail = rest[min(cut) + 1:] if cut else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11, help="cohort seed (not one a model was trained or tuned on)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "benchmark_adult")
    parser.add_argument("--no-sample", action="store_true", help="skip the 15-step sample")
    parser.add_argument("--load-note", default="other jobs paused", help="what else ran on the machine")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    rows = []
    for index in range(args.patients):
        rows.append(time_patient(index, args.seed, args.work, sample=index == 0 and not args.no_sample))
        print(json.dumps(rows[-1]), flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{torch.get_num_threads()} torch threads")
    section = report(rows, machine, args.load_note)
    (args.work / "results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    write_section(args.output, section)
    print(section)


if __name__ == "__main__":
    main()
