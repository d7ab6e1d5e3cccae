"""Generate the synthetic IPF cohort and print its summary.

    python scripts/generate_cohort.py --out data/cohort --n 24 --seed 0 [--dicom] [--body-scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.synthetic import DEFAULT_BODY_SCALE, summarize_cohort, timed_generation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/cohort"), help="cohort folder")
    parser.add_argument("--n", type=int, default=24, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (same seed, same bytes)")
    parser.add_argument("--body-scale", type=float, default=DEFAULT_BODY_SCALE, help="1.0 = adult chest")
    parser.add_argument("--dicom", action="store_true", help="also write each initial scan as a DICOM series")
    parser.add_argument("--workers", type=int, default=1, help="patients generated at once (processes)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in the test split")
    args = parser.parse_args()
    datalist, seconds = timed_generation(args.out, args.n, args.seed, body_scale=args.body_scale,
                                         write_dicom=args.dicom, workers=args.workers,
                                         test_fraction=args.test_fraction)
    print(json.dumps(summarize_cohort(args.out), indent=2, ensure_ascii=False))
    print(f"{seconds:.2f} s per patient; datalist: {datalist}")


if __name__ == "__main__":
    main()
