"""The ``cirresdiff`` command line: one verb per workflow, each running the bundle's configs.

    cirresdiff prepare --initial PATH --followup PATH --out DIR [--segmenter threshold|totalsegmentator]
        [--keep_failed_qc]
    cirresdiff prepare --cohort DIR --out DIR [--keep_failed_qc]
    cirresdiff pretrain [--dataset DIR]
    cirresdiff train [--dataset DIR] [--ablation DM|DM-CIP|DM-R|DM-R-CIP]
    cirresdiff evaluate [--dataset DIR] [--ablation ...]
    cirresdiff predict --input PATH [--record JSON | --records_csv CSV] [--out DIR] [--samples N]
    cirresdiff demo
    cirresdiff export --out FILE.zip [--program FILE.pt2]

Options not listed are config overrides: ``--max_epochs 5`` sets the config id ``max_epochs``.

Bad input ends with a one-line message on stderr and a non-zero exit status, without a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import fire

from cirresdiff_bundle.runner import BUNDLE_ROOT, run_config

USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)
"""Exceptions that describe a problem with the user's input or set-up (``CTInputError`` is a ``ValueError``,
a missing file or an unwritable output folder an ``OSError``, a mistyped config override a ``TypeError``)."""


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
        grid: str | None = None,
        normalization: str | None = None,
        margin_mm: float | None = None,
        keep_failed_qc: bool = False,
        workers: int = 1,
        config: str = "prepare",
    ) -> None:
        """Target-region pre-registration of one pair (--initial, --followup) or of a whole cohort (--cohort).

        A pair whose registration fails the QC ends the command with exit status 3 and the reason on
        stderr (its folder holds qc.json and qc.png to inspect); in batch mode it is left out of the
        datalist and listed in failures.json (exit status 1). --keep_failed_qc keeps such pairs.

        Args:
            out: output folder (the case folder for a pair, the prepared dataset for a cohort).
            initial: initial CT: DICOM series folder or NIfTI / NRRD / MHA file.
            followup: follow-up CT of the same patient.
            cohort: cohort folder with datalist.json and lung_function.csv (batch mode).
            segmenter: "threshold" (weight-free, default) or "totalsegmentator" (needs its weights).
            grid: the model grid: a preset of custom/grid.py ("adult", the default; "demo"; "paper") or
                JSON such as '{"size": [96, 96, 96], "spacing_mm": 1.0}'.
            normalization: "window" (default) or "minmax".
            margin_mm: dilation of the lungs in mm.
            keep_failed_qc: prepare (and list in the datalist) pairs whose registration fails the QC.
            workers: pairs prepared at once in separate processes (batch mode).
            config: config name or path (default configs/prepare.json).
        """
        overrides = {k: v for k, v in (("segmenter", segmenter), ("normalization", normalization),
                                       ("margin_mm", margin_mm)) if v is not None}
        if keep_failed_qc:
            overrides["keep_failed_qc"] = True
        if grid is not None:
            overrides["grid"] = json.loads(grid) if isinstance(grid, str) and grid.lstrip().startswith("{") else grid
        if cohort is not None:
            if initial is not None or followup is not None:
                raise UsageError("give either --cohort or --initial and --followup, not both")
            workflow = run_config([config], run_id="run", cohort_dir=str(Path(cohort).resolve()),
                                  prepared_dir=str(Path(out).resolve()), workers=int(workers), **overrides)
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
        from custom.preregistration import RegistrationQCError
        from custom.registration import RegistrationError

        try:
            workflow = run_config([config], run_id="run_pair", initial=str(Path(initial).resolve()),
                                  followup=str(Path(followup).resolve()), out_dir=str(Path(out).resolve()), **overrides)
        except Exception as error:
            cause = root_cause(error)
            # Read, but not aligned (QC failed, or ANTs stopped): a status of its own, not bad input's 2.
            if isinstance(cause, (RegistrationQCError, RegistrationError)):
                print(f"cirresdiff: registration failed: {cause}", file=sys.stderr)
                sys.exit(3)
            raise
        qc = workflow.parser.get_parsed_content("prepare_pair")
        print(json.dumps({"out": str(Path(out).resolve()), "qc": qc["qc"], "qc_failures": qc["qc_failures"],
                          "warnings": qc["warnings"]}, indent=2))

    def pretrain(self, dataset: str | None = None, config: str = "pretrain_clip", **overrides) -> None:
        """CLIP pre-training of the lung-function text encoder (configs/pretrain_clip.json).

        Args:
            dataset: prepared dataset folder (default data/prepared, generated on first use).
            config: config name or path.
            overrides: further config ids and values, e.g. --max_epochs 50.
        """
        run_config([config], **_dataset(dataset), **overrides)

    def train(self, dataset: str | None = None, ablation: str = "DM-R-CIP", **overrides) -> None:
        """Train the denoiser (configs/train.json plus the ablation's override files); resumes from runs/.

        Args:
            dataset: prepared dataset folder (default data/prepared, generated on first use).
            ablation: DM, DM-CIP, DM-R or DM-R-CIP (the full model, default).
            overrides: further config ids and values, e.g. --max_epochs 100.
        """
        run_config(["train", *_ablation(ablation)], **_dataset(dataset), **overrides)

    def evaluate(self, dataset: str | None = None, ablation: str = "DM-R-CIP", **overrides) -> None:
        """Generate follow-ups for the test split and write per-case metrics and the summary (configs/evaluate.json).

        Args:
            dataset: prepared dataset folder.
            ablation: which trained model to evaluate (its override files are applied).
            overrides: further config ids and values, e.g. --output_dir runs/eval.
        """
        run_config(["train", *_ablation(ablation), "evaluate"], **_dataset(dataset), method_name=ablation, **overrides)

    def predict(self, input: str, record: str | None = None, records_csv: str | None = None, out: str | None = None,
                samples: int = 1, weeks: float = 52.0, **overrides) -> None:
        """Predict the follow-up CT of one initial CT (file or DICOM folder) or of a folder of them.

        Args:
            input: initial CT: NIfTI / NRRD / MHA file, DICOM series folder, or a folder of those.
            record: lung-function record as JSON, e.g. '{"FVC": 2400, "Percent": 65, "Age": 70, "Sex": "Male"}'.
            records_csv: OSIC-style CSV of records by patient id (file or folder name).
            out: output folder (default runs/inference).
            samples: samples to draw; more than one also writes an uncertainty map.
            weeks: interval to the follow-up (default 52; 1 to 260), for the FVC forecast and the generated CT.
            overrides: further config ids and values of configs/inference.json.
        """
        from cirresdiff_bundle.api import predict_followup

        parsed = json.loads(record) if isinstance(record, str) else record
        results = predict_followup(input, record=parsed, records_csv=records_csv, output_dir=out, num_samples=samples,
                                   weeks=weeks, **overrides)
        print(json.dumps([r["summary"] for r in results], indent=2))

    def demo(self) -> None:
        """The main job end to end on the synthetic cohort (generate, prepare, pre-train, train, evaluate, infer)."""
        from cirresdiff_bundle.demo import run_demo

        run_demo()

    def export(self, out: str, program: str | None = None) -> None:
        """Write a model-zoo style archive of the bundle (configs, models, custom code, docs, LICENSE).

        Args:
            out: destination .zip file.
            program: also write the denoiser as a torch.export program (.pt2) to this path.
        """
        from cirresdiff_bundle.export import export_bundle, export_program

        print(export_bundle(out))
        if program is not None:
            print(export_program(program))


ABLATIONS: dict[str, list[str]] = json.loads((BUNDLE_ROOT / "configs" / "ablations" / "table.json").read_text())
"""The paper's Table 1 rows: override files of each ablation on top of configs/train.json (DM-R-CIP is
the full model), as listed in ``configs/ablations/table.json``."""


def _ablation(name: str) -> list[str]:
    if name not in ABLATIONS:
        raise UsageError(f"unknown ablation {name!r}: choose one of {list(ABLATIONS)}")
    return ABLATIONS[name]


def _dataset(dataset: str | None) -> dict:
    return {} if dataset is None else {"dataset_dir": str(Path(dataset).resolve())}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``cirresdiff`` command.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    # Summaries print "±"; a terminal with an ASCII locale should show "?" rather than crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
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
