"""One-line Python use: ``predict_followup(initial_ct, record)``.

It runs the bundle's own ``configs/inference.json`` through ``monai.bundle.ConfigWorkflow`` (the
same pipeline as ``python -m monai.bundle run --config_file configs/inference.json``) and returns
the outputs as arrays as well as files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from cirresdiff_bundle.runner import BUNDLE_ROOT, run_config
from custom.progression import check_weeks  # noqa: E402  (custom is on the path once runner is imported)


def _load(path: str | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    if path is None:
        return None, None
    image = nib.load(path)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def predict_followup(
    initial: str | os.PathLike | np.ndarray,
    record: Mapping | None = None,
    affine: np.ndarray | None = None,
    records_csv: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    num_samples: int = 1,
    weeks: float = 52.0,
    bundle_root: str | os.PathLike = BUNDLE_ROOT,
    **overrides,
) -> list[dict]:
    """Generate the follow-up CT about one year after ``initial`` and the progression probability.

    Args:
        initial: initial CT: NIfTI / NRRD / MHA path, DICOM series folder, a folder of those, or
            an (x, y, z) array in HU with ``affine``.
        record: lung-function record (``FVC``, ``Percent``, ``Age``, ``Sex``, ``SmokingStatus``,
            optional ``DLCO``, ``PEF``); ``None`` writes every field as not measured.
        affine: voxel-to-RAS affine when ``initial`` is an array.
        records_csv: OSIC-style CSV of records by patient id, for a folder of CTs.
        output_dir: where NIfTI and PNG outputs are written; ``None`` keeps only the arrays.
        num_samples: posterior samples to draw; more than one also returns their voxel-wise standard
            deviation as the uncertainty. The follow-up itself is the mean prediction (one network
            pass); ``prediction="sample"`` returns the mean of the samples instead.
        weeks: interval to the follow-up (1 to 260 weeks), for the FVC forecast and the generated CT
            (the shipped denoiser's predicted change is linear in it, ``interval_scaling``).
        bundle_root: the bundle folder whose configs and models are used.
        overrides: further config ids of ``configs/inference.json`` and their values; plain values
            only: a ``$`` expression anywhere in them (or in ``record``) is refused, so input from
            outside can never run code through MONAI's config parser.

    Returns:
        One dict per case: ``patient``, ``followup`` (HU array, initial scan's space), ``affine``,
        ``change`` (HU), ``fibrosis`` (label map, ``custom.fibrosis.FIBROSIS_LABELS``), ``uncertainty``
        (HU or ``None``), ``progression_probability`` (or ``None`` without a trained classifier),
        ``fvc_forecast`` (``weeks``, ``fvc_ml``, ``sd_ml``, ``decline_percent``, ``progression_probability``
        of the FVC forecast; ``None`` without a record),
        ``text``, ``weeks`` (the interval predicted for) and ``summary`` (with the HAA shares under
        ``fibrosis``; paths when written).
    """
    with tempfile.TemporaryDirectory(prefix="cirresdiff_") as tmp:
        if isinstance(initial, np.ndarray):
            if affine is None:
                raise ValueError("an array input needs its voxel-to-RAS affine")
            source = Path(tmp) / "input" / "case.nii.gz"
            source.parent.mkdir()
            nib.save(nib.Nifti1Image(np.asarray(initial, dtype=np.float32), affine), str(source))
            initial = source
        out = Path(output_dir) if output_dir is not None else Path(tmp) / "outputs"
        workflow = run_config(
            ["inference"], run_id="run", bundle_root=bundle_root, allow_code=False, input=str(Path(initial).resolve()),
            record=dict(record) if record is not None else None,
            records_csv=str(records_csv) if records_csv is not None else None, output_dir=str(out.resolve()),
            num_samples=num_samples, weeks=check_weeks(weeks), **overrides,
        )
        results = []
        for summary in workflow.parser.get_parsed_content("writer").written:
            files = summary["files"]
            followup, out_affine = _load(files["followup"])
            results.append({
                "patient": summary["patient"], "followup": followup, "affine": out_affine,
                "change": _load(files["change"])[0], "fibrosis": _load(files["fibrosis"])[0],
                "uncertainty": _load(files.get("uncertainty"))[0],
                "progression_probability": summary["progression_probability"], "text": summary["text"],
                "weeks": summary["weeks"], "fvc_forecast": summary["fvc_forecast"],
                "summary": summary if output_dir is not None else {k: v for k, v in summary.items() if k != "files"},
            })
        return results
