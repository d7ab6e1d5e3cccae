"""Preparation of a cohort with 1 and with N worker processes: wall time, speed-up, identical outputs.

    python scripts/benchmark_prepare_workers.py --cohort data/seed2/cohort --pairs 8 --workers 2 --out bench.json

The first ``--pairs`` patients of the cohort's datalist are prepared twice with
``custom.preregistration.prepare_cohort`` (the code ``configs/prepare.json`` runs), once with one
process and once with ``--workers`` processes, each into an empty folder. ANTs runs one thread in
every worker (``custom/registration.py``), so the two runs must give the same voxels: every prepared
image is compared array for array, and the script fails if one differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.io import atomic_write_bytes  # noqa: E402
from custom.preregistration import prepare_cohort  # noqa: E402


def subset_cohort(cohort: Path, n_pairs: int, out: Path) -> Path:
    """A cohort folder whose datalist holds the first ``n_pairs`` patients of ``cohort`` (the files are links)."""
    datalist = json.loads((cohort / "datalist.json").read_text(encoding="utf-8"))
    entries = [e for section in ("training", "validation", "testing") for e in datalist.get(section, [])][:n_pairs]
    out.mkdir(parents=True)
    for entry in entries:
        (out / entry["patient"]).symlink_to((cohort / entry["patient"]).resolve())
    (out / "lung_function.csv").symlink_to((cohort / "lung_function.csv").resolve())
    atomic_write_bytes(out / "datalist.json", json.dumps({"training": entries}, indent=2).encode())
    return out


def prepared_arrays(prepared: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(prepared)): np.asarray(nib.load(str(p)).dataobj)
            for p in sorted(prepared.glob("*/*.nii.gz"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True, help="generated cohort folder (datalist.json)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs prepared in each run")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the parallel run")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cohort = subset_cohort(args.cohort, args.pairs, Path(tmp) / "cohort")
        seconds, arrays = {}, {}
        for workers in (1, args.workers):
            prepared = Path(tmp) / f"prepared_{workers}"
            start = time.perf_counter()
            summary = prepare_cohort(cohort, prepared, progress=False, workers=workers)
            seconds[workers] = time.perf_counter() - start
            if summary["failed"]:
                sys.exit(f"{workers} worker(s): failed pairs {summary['failed']}")
            arrays[workers] = prepared_arrays(prepared)
            print(f"{workers} worker(s): {seconds[workers]:.1f} s for {args.pairs} pairs", flush=True)
        one, many = arrays[1], arrays[args.workers]
        differing = sorted(k for k in one if k not in many or not np.array_equal(one[k], many[k]))
        if set(one) != set(many) or differing:
            sys.exit(f"the {args.workers}-worker run differs from the 1-worker run: {differing or 'file sets'}")
    result = {
        "pairs": args.pairs, "workers": args.workers, "seconds_1_worker": round(seconds[1], 1),
        f"seconds_{args.workers}_workers": round(seconds[args.workers], 1),
        "seconds_per_pair_1_worker": round(seconds[1] / args.pairs, 1),
        "speed_up": round(seconds[1] / seconds[args.workers], 2),
        "identical_images": len(one), "cpu_cores": os.cpu_count(), "machine": platform.machine(),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        atomic_write_bytes(args.out, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
