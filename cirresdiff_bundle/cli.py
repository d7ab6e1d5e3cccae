"""The ``cirresdiff`` command line: one verb per workflow, each running the bundle's configs.

    cirresdiff prepare --initial PATH --followup PATH --out DIR [--segmenter threshold|totalsegmentator]
    cirresdiff prepare --cohort DIR --out DIR

Bad input ends with a one-line message on stderr and a non-zero exit status, without a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import fire

from cirresdiff_bundle.runner import run_config

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, RuntimeError)
"""Exceptions that describe a problem with the user's input or set-up (``CTInputError`` is a ``ValueError``)."""


class UsageError(ValueError):
    """Wrong combination of command-line options."""


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: configs wrap errors in ``Failed to evaluate ...`` layers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


class Commands:
    """CIResDiff: predicting idiopathic pulmonary fibrosis progression from an initial chest CT."""

    def prepare(
        self,
        out: str,
        initial: str | None = None,
        followup: str | None = None,
        cohort: str | None = None,
        segmenter: str | None = None,
        grid: Sequence[int] | None = None,
        normalization: str | None = None,
        margin_mm: float | None = None,
        config: str = "prepare",
    ) -> None:
        """Target-region pre-registration of one pair (--initial, --followup) or of a whole cohort (--cohort).

        Args:
            out: output folder (the case folder for a pair, the prepared dataset for a cohort).
            initial: initial CT: DICOM series folder or NIfTI / NRRD / MHA file.
            followup: follow-up CT of the same patient.
            cohort: cohort folder with datalist.json and lung_function.csv (batch mode).
            segmenter: "threshold" (weight-free, default) or "totalsegmentator" (needs its weights).
            grid: output grid in 1 mm voxels, e.g. 96,96,96 (default) or 512,512,256.
            normalization: "window" (default) or "minmax".
            margin_mm: dilation of the lungs in mm.
            config: config name or path (default configs/prepare.json).
        """
        overrides = {k: v for k, v in (("segmenter", segmenter), ("normalization", normalization),
                                       ("margin_mm", margin_mm)) if v is not None}
        if grid is not None:
            overrides["grid"] = [int(g) for g in (grid if isinstance(grid, (list, tuple)) else str(grid).split(","))]
        if cohort is not None:
            if initial is not None or followup is not None:
                raise UsageError("give either --cohort or --initial and --followup, not both")
            workflow = run_config([config], run_id="run", cohort_dir=str(Path(cohort).resolve()),
                                  prepared_dir=str(Path(out).resolve()), **overrides)
            summary = workflow.parser.get_parsed_content("prepare")
            print(f"prepared {len(summary['prepared'])}, already complete {len(summary['skipped'])}, "
                  f"failed {len(summary['failed'])}; datalist: {summary['datalist']}")
            for patient, warnings in summary["warnings"].items():
                print(f"QC warning {patient}: {'; '.join(warnings)}")
            for patient, reason in summary["failed"].items():
                print(f"FAILED {patient}: {reason}", file=sys.stderr)
            if summary["failed"]:
                sys.exit(1)
            return
        if initial is None or followup is None:
            raise UsageError("give --initial and --followup (one pair) or --cohort (batch mode)")
        workflow = run_config([config], run_id="run_pair", initial=str(Path(initial).resolve()),
                              followup=str(Path(followup).resolve()), out_dir=str(Path(out).resolve()), **overrides)
        qc = workflow.parser.get_parsed_content("prepare_pair")
        print(json.dumps({"out": str(Path(out).resolve()), "qc": qc["qc"], "warnings": qc["warnings"]}, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``cirresdiff`` command.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    try:
        fire.Fire(Commands, command=list(argv) if argv is not None else None, name="cirresdiff")
    except USER_ERRORS as error:
        cause = root_cause(error)
        if not isinstance(cause, USER_ERRORS):
            raise
        print(f"cirresdiff: error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
