"""Target-region pre-registration (CIResDiff Sec. 2.1) as MONAI transforms and a batch driver.

For a pair (initial, follow-up): load and check both CTs, segment left and right lungs, dilate,
register each follow-up lung to the initial one (ANTs affine) and merge, then cut the dilated
lung region out on the model grid (``custom.grid``: isotropic voxels, fixed size) centred on it,
and map HU to [0, 1].

The transforms read top to bottom in the configs:

- preparation (``configs/prepare.json``): ``LoadCTd`` -> ``SegmentLungsd`` -> ``DilateMaskd`` ->
  ``RegisterLungsd`` -> ``ResampleToGridd`` -> ``NormalizeHUd``;
- inference preprocessing (``configs/inference.json``, initial scan only): the same without ``RegisterLungsd``.

The geometry and intensity helpers they use (resampling, affines, HU <-> [0, 1]) live in
``custom.geometry``, the QC picture in ``custom.figures``.

Everything stays in the initial scan's physical (RAS) frame: the output grid is axis-aligned and
its affine places it where the lungs are in the initial scan.

Intensities: a fixed HU window (``constants.HU_WINDOW``) by default, or per-scan min-max inside
the lung region (the paper's choice); docs/preregistration.md compares them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform

from custom.clinical.text import read_lung_function
from custom.constants import AIR_HU, HU_WINDOW, REGION_MARGIN_MM
from custom.figures import qc_figure
from custom.geometry import as_meta, normalize_hu, resample, voxel_spacing
from custom.grid import Grid, as_grid
from custom.io import CTInputError, atomic_folder, check_output_dir, load_ct, write_json, write_nifti
from custom.registration import register_pair
from custom.segmentation import dilate_mm, segment_lungs

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
"""The bundle folder (its ``configs/`` holds ``prepare.json``)."""
logger = logging.getLogger(__name__)

PREPARED_FILES = ("image.nii.gz", "target.nii.gz", "mask.nii.gz", "lungs.nii.gz", "qc.json", "qc.png")
"""Files of one prepared case; a case folder holding all of them is complete. ``mask`` is the dilated
lung region the model predicts; ``lungs`` the undilated lung labels of the initial scan, where it is scored."""

REFERENCE_FILES = {"oracle": "oracle.nii.gz", "new_lesions": "new_lesions.nii.gz"}
"""Extra files of a prepared synthetic case (``add_references``): the oracle follow-up and the new lesions."""


def _source_name(image: MetaTensor, key: Hashable) -> str:
    return str(image.meta.get("filename_or_obj", key))


class LoadCTd(MapTransform):
    """Load CTs (DICOM folder or NIfTI / NRRD / MHA) as checked HU MetaTensors (1, x, y, z), RAS.

    Args:
        keys: keys holding file or folder paths.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            hu, affine = load_ct(d[key])
            d[key] = as_meta(hu, affine, {"filename_or_obj": str(d[key])})
        return d


class SegmentLungsd(MapTransform):
    """Segment left and right lungs of each CT into ``<key><postfix>`` (1 left, 2 right).

    Args:
        keys: keys of HU images.
        segmenter: ``"threshold"`` or ``"totalsegmentator"``.
        fast: TotalSegmentator's 3 mm fast model.
        postfix: appended to the key to name the label map.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, segmenter: str = "threshold", fast: bool = True,
                 postfix: str = "_lungs", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.segmenter, self.fast, self.postfix = segmenter, bool(fast), postfix

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            try:
                labels = segment_lungs(np.asarray(image[0]), np.asarray(image.affine), self.segmenter, self.fast)
            except CTInputError as e:
                raise CTInputError(f"{_source_name(image, key)}: {e}") from e
            d[f"{key}{self.postfix}"] = as_meta(labels, image.affine)
        return d


class DilateMaskd(MapTransform):
    """Dilate lung labels by a margin in mm into a binary region (keeps peri-lung tissue and subpleural lesions).

    Args:
        keys: keys of lung label maps.
        margin_mm: dilation radius in mm (``REGION_MARGIN_MM``, shared with ``RegisterLungsd``).
        output_key: key of the dilated union of all labels.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, margin_mm: float = REGION_MARGIN_MM,
                 output_key: str = "mask") -> None:
        super().__init__(keys)
        self.margin_mm, self.output_key = float(margin_mm), output_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = d[key]
            region = dilate_mm(np.asarray(labels[0]) > 0, self.margin_mm, voxel_spacing(np.asarray(labels.affine)))
            d[self.output_key] = as_meta(region.astype(np.uint8), labels.affine)
        return d


class RegisterLungsd(MapTransform):
    """Register the follow-up lungs to the initial lungs (per lung, ANTs affine) and merge onto the initial grid.

    Replaces ``moving_key`` by the aligned follow-up (air outside the merged region), adds
    ``<moving_key>_unregistered`` (the follow-up resampled without registration, for the QC
    figure) and ``registration`` (per-lung transforms and QC metrics).

    The merged region must be ``DilateMaskd``'s region, or the target would hold air where the
    mask says lung region: both default to ``custom.constants.REGION_MARGIN_MM``, which preparation and
    inference share.

    Args:
        fixed_key: key of the initial scan (its lungs under ``<fixed_key>_lungs``).
        moving_key: key of the follow-up scan (its lungs under ``<moving_key>_lungs``).
        margin_mm: dilation of each initial lung defining its region in the merge.
        metric_margin_mm: dilation of the initial lung mask restricting the registration metric.
        registration_spacing_mm: isotropic voxel size the registration works at (applied at full resolution).
        transform_type: ANTs linear transform, ``"Affine"``, ``"Similarity"`` or ``"Rigid"``.
        seed: positive seed of ANTs' random sampling.
    """

    def __init__(self, fixed_key: str = "image", moving_key: str = "target", margin_mm: float = REGION_MARGIN_MM,
                 metric_margin_mm: float = 3.0, registration_spacing_mm: float = 3.0, transform_type: str = "Affine",
                 seed: int = 1) -> None:
        super().__init__([fixed_key, moving_key])
        self.fixed_key, self.moving_key = fixed_key, moving_key
        self.margin_mm, self.metric_margin_mm = float(margin_mm), float(metric_margin_mm)
        self.registration_spacing_mm = float(registration_spacing_mm)
        self.transform_type, self.seed = transform_type, int(seed)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        fixed, moving = d[self.fixed_key], d[self.moving_key]
        affine = np.asarray(fixed.affine)
        result = register_pair(
            np.asarray(fixed[0]), affine, np.asarray(d[f"{self.fixed_key}_lungs"][0]),
            np.asarray(moving[0]), np.asarray(moving.affine), np.asarray(d[f"{self.moving_key}_lungs"][0]),
            margin_mm=self.margin_mm, metric_margin_mm=self.metric_margin_mm,
            registration_spacing_mm=self.registration_spacing_mm, transform_type=self.transform_type, seed=self.seed,
        )
        d[self.moving_key] = as_meta(result["aligned"], affine, moving.meta)
        d[f"{self.moving_key}_unregistered"] = as_meta(result["unregistered"], affine, moving.meta)
        d["registration"] = {"transforms": result["transforms"], "qc": result["qc"]}
        return d


class ResampleToGridd(MapTransform):
    """Resample images and masks onto the model grid, centred on the lung region.

    The grid's centre is the centre of the bounding box of ``region_key`` (in the initial scan's
    RAS frame). Masks use nearest-neighbour-like interpolation (linear, then > 0.5); images are
    linear (anti-aliased) and padded with air. The source geometry is kept in the metadata
    (``source_affine``, ``source_shape``), and the share of the region that fits in the grid in
    ``region_inside_grid``.

    Args:
        keys: keys of HU images on the initial scan's grid.
        region_key: key of the binary region that centres the grid (resampled as a mask).
        grid: the model grid: a ``custom.grid`` preset name (``"adult"``, ``"paper"``, ...) or
            ``{"size", "spacing_mm"}``.
        fill: HU outside the source image.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, region_key: str = "mask",
                 grid: Grid | str | Mapping = "adult", fill: float = AIR_HU, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.region_key, self.grid, self.fill = region_key, as_grid(grid), float(fill)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        region_image = d[self.region_key]
        source_affine = np.asarray(region_image.affine)
        region = np.asarray(region_image[0]) > 0
        if not region.any():
            raise CTInputError(f"{_source_name(region_image, self.region_key)}: the lung region is empty")
        idx = np.stack(np.nonzero(region), 1)
        centre = source_affine[:3, :3] @ ((idx.min(0) + idx.max(0)) / 2.0) + source_affine[:3, 3]
        target_affine, size = self.grid.affine(centre), self.grid.size
        mask = resample(region, source_affine, target_affine, size, order=1, fill=0.0) > 0.5
        region_mm3 = region.sum() * float(np.prod(voxel_spacing(source_affine)))
        geometry = {"source_affine": source_affine, "source_shape": np.asarray(region.shape),
                    "region_inside_grid": float(mask.sum() * self.grid.spacing_mm**3 / max(region_mm3, 1e-6))}
        for key in self.key_iterator(d):
            image = d[key]
            hu = resample(np.asarray(image[0]), np.asarray(image.affine), target_affine, size, order=1, fill=self.fill,
                          antialias=True)
            d[key] = as_meta(hu.astype(np.float32), target_affine, {**image.meta, **geometry})
        d[self.region_key] = as_meta(mask.astype(np.uint8), target_affine, {**region_image.meta, **geometry})
        return d


class NormalizeHUd(MapTransform):
    """Map HU to [0, 1] (fixed window or min-max), and set voxels outside the region mask to 0.

    Zero outside the region makes the model see exactly the target region, the same in the
    initial and the aligned follow-up.

    Args:
        keys: keys of HU images.
        mode: ``"window"`` (default: steadier across scans, see docs/preregistration.md) or ``"minmax"``.
        window: (low, high) HU of the fixed window.
        mask_key: key of the region mask on the same grid; ``None`` keeps every voxel.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, mode: str = "window", window: Sequence[float] = HU_WINDOW,
                 mask_key: str | None = "mask", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in ("window", "minmax"):
            raise ValueError(f"unknown normalization {mode!r}: use 'window' or 'minmax'")
        self.mode, self.window, self.mask_key = mode, tuple(float(w) for w in window), mask_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        mask = np.asarray(d[self.mask_key][0]) > 0 if self.mask_key is not None else None
        for key in self.key_iterator(d):
            image = d[key]
            values = normalize_hu(np.asarray(image[0]), self.mode, self.window, mask)
            if mask is not None:
                values = np.where(mask, values, 0.0).astype(np.float32)
            out = as_meta(values, image.affine, image.meta)
            out.meta["normalization"] = self.mode
            d[key] = out
        return d


def prepare_config(**overrides) -> ConfigParser:
    """``configs/prepare.json`` with config overrides (e.g. ``grid="small"``): the one definition of preparation.

    Args:
        overrides: config ids and their values.
    """
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "prepare.json"))
    parser.update(overrides)
    return parser


def preparation_chain(**overrides) -> Compose:
    """The pair-preparation chain ``configs/prepare.json#preparation``, for use from Python.

    Args:
        overrides: config ids of ``prepare.json`` and their values (``grid``, ``segmenter``, ``normalization``, ...).
    """
    return prepare_config(**overrides).get_parsed_content("preparation")


class RegistrationQCError(ValueError):
    """A prepared pair whose registration fails the QC (a failed registration, or scans of different patients)."""


class PairPreparer:
    """Prepare one (initial, follow-up) pair into a case folder: image, target, mask, qc.json, qc.png.

    The folder is written under a temporary name beside its destination and renamed when complete,
    so an interrupted or failing case leaves nothing that looks prepared.

    The registration QC gates: a pair failing it is still written, for its qc.json and qc.png to
    be inspected (``qc_passed`` false, the reasons under ``qc_failures``), but then
    ``RegistrationQCError`` is raised, so that neither the command line (non-zero exit) nor
    ``prepare_cohort`` (the pair stays out of the datalist, listed in failures.json) passes it on
    as prepared, unless ``keep_failed_qc`` is set.

    Args:
        transform: the preparation chain (default ``configs/prepare.json#preparation``, see ``preparation_chain``).
        min_dice: a lung's mask Dice after registration below this fails the QC (a failed registration,
            or different patients).
        min_ncc: a lung's NCC of HU after registration below this fails the QC (different patients?).
        max_volume_change: a lung transform changing its volume by more than this fraction (|det - 1|)
            fails the QC (breathing and a year of fibrosis change it less; different patients may not).
        max_dice_loss: a lung whose mask Dice after registration is lower than before by more than this
            fails the QC (the registration made the overlap worse).
        min_region_inside_grid: warn (not fail) when less of the lung region fits the grid.
        keep_failed_qc: return a pair that fails the QC instead of raising ``RegistrationQCError``.
    """

    def __init__(self, transform: Callable[[dict], dict] | None = None, min_dice: float = 0.8, min_ncc: float = 0.25,
                 max_volume_change: float = 0.25, max_dice_loss: float = 0.01, min_region_inside_grid: float = 0.98,
                 keep_failed_qc: bool = False) -> None:
        self.transform = transform if transform is not None else preparation_chain()
        self.min_dice, self.min_ncc = float(min_dice), float(min_ncc)
        self.max_volume_change, self.max_dice_loss = float(max_volume_change), float(max_dice_loss)
        self.min_region_inside_grid, self.keep_failed_qc = float(min_region_inside_grid), bool(keep_failed_qc)

    def run_chain(self, initial: str, followup: str) -> tuple[dict, dict[str, float]]:
        """Apply the chain step by step, timing each transform.

        Args:
            initial: initial CT path.
            followup: follow-up CT path.
        """
        steps = self.transform.transforms if isinstance(self.transform, Compose) else [self.transform]
        d: dict = {"image": str(initial), "target": str(followup)}
        seconds = {}
        for step in steps:
            start = time.perf_counter()
            d = step(d)
            name = type(step).__name__
            seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - start, 3)
        return d, seconds

    def qc_failures(self, record: Mapping) -> list[str]:
        """Reasons a pair's registration fails the QC (none: it passes), from its qc.json record.

        Computed from the recorded metrics, so a pair prepared earlier is judged by the same rules.

        Args:
            record: the qc.json content (``qc`` and ``transforms`` per lung).
        """
        found = []
        for lung, metrics in record["qc"].items():
            volume = float(np.linalg.det(np.asarray(record["transforms"][lung])[:3, :3]))
            if metrics["dice_after"] < self.min_dice:
                found.append(f"{lung}: mask Dice after registration {metrics['dice_after']:.2f} < {self.min_dice:.2f}: "
                             "a failed registration or different patients?")
            if metrics["dice_after"] < metrics["dice_before"] - self.max_dice_loss:
                found.append(f"{lung}: the registration made the lungs overlap worse (mask Dice "
                             f"{metrics['dice_before']:.3f} -> {metrics['dice_after']:.3f}): a failed registration")
            if metrics["ncc_after"] < self.min_ncc:
                found.append(f"{lung}: NCC after registration {metrics['ncc_after']:.2f} < {self.min_ncc:.2f}: "
                             "different patients?")
            if abs(volume - 1.0) > self.max_volume_change:
                found.append(f"{lung}: the registration changes the lung volume by a factor {volume:.2f}: "
                             "different patients or a failed registration?")
        return found

    def qc_warnings(self, record: Mapping) -> list[str]:
        """Warnings that do not fail the QC: the grid's coverage of the lung region.

        Args:
            record: the qc.json content.
        """
        inside = float(record["region_inside_grid"])
        if inside < self.min_region_inside_grid:
            return [f"the grid holds only {100 * inside:.1f} % of the lung region: use a larger grid"]
        return []

    def check(self, record: Mapping, folder: Path) -> None:
        """Raise ``RegistrationQCError`` when the pair fails the QC and failing pairs are not kept.

        Args:
            record: the qc.json content.
            folder: the case folder (named in the message, for its qc.png).
        """
        failures = self.qc_failures(record)
        if failures and not self.keep_failed_qc:
            raise RegistrationQCError(f"{record['patient']}: registration QC failed: {'; '.join(failures)} "
                                      f"(pictured in {folder / 'qc.png'}; keep_failed_qc keeps such a pair)")

    def __call__(self, initial: str | os.PathLike, followup: str | os.PathLike, out_dir: str | os.PathLike,
                 patient: str | None = None) -> dict:
        """Prepare the pair; returns the QC record written to qc.json (raises ``RegistrationQCError`` after
        writing it, see above).

        Args:
            initial: initial CT (DICOM folder or image file).
            followup: follow-up CT of the same patient.
            out_dir: case folder to create (must not exist).
            patient: patient id for the QC record and the figure title.
        """
        out = Path(out_dir)
        # atomic_folder would replace an existing folder
        if out.exists():
            raise FileExistsError(f"{out}: the output folder already exists; remove it or choose another")
        start = time.perf_counter()
        d, seconds = self.run_chain(initial, followup)
        qc = {"patient": patient or out.name, "initial": str(initial), "followup": str(followup),
              "grid": {"size": list(d["image"].shape[1:]),
                       "spacing_mm": round(float(voxel_spacing(np.asarray(d["image"].affine))[0]), 4)},
              "normalization": d["image"].meta.get("normalization"),
              **d["registration"], "region_inside_grid": round(float(d["mask"].meta["region_inside_grid"]), 4)}
        qc["qc_failures"] = self.qc_failures(qc)
        qc["qc_passed"] = not qc["qc_failures"]
        qc["warnings"], qc["seconds"] = self.qc_warnings(qc), seconds
        title = f"{qc['patient']}: registration QC" + (" FAILED" if qc["qc_failures"] else "")
        # The folder is written even when the QC fails, so that qc.png can be inspected; check() raises after.
        with atomic_folder(out) as tmp:
            for key in ("image", "target"):
                write_nifti(tmp / f"{key}.nii.gz", np.asarray(d[key][0], dtype=np.float32), np.asarray(d[key].affine))
            write_nifti(tmp / "mask.nii.gz", np.asarray(d["mask"][0], dtype=np.uint8), np.asarray(d["mask"].affine))
            lungs = d["image_lungs"]
            write_nifti(tmp / "lungs.nii.gz",
                        resample(np.asarray(lungs[0]), np.asarray(lungs.affine), np.asarray(d["mask"].affine),
                                 d["mask"].shape[1:], order=0, fill=0.0).astype(np.uint8),
                        np.asarray(d["mask"].affine))
            qc_figure(tmp / "qc.png",
                      *(np.asarray(d[k][0]) for k in ("image", "target_unregistered", "target", "mask")),
                      title=title + (" - WARNING" if qc["warnings"] else ""))
            qc["seconds"]["total"] = round(time.perf_counter() - start, 3)
            write_json(tmp / "qc.json", qc)
        self.check(qc, out)
        return qc


def add_references(folder: Path, initial_lesions: Path, oracle: Path, oracle_lesions: Path,
                   window: Sequence[float] = HU_WINDOW) -> dict[str, str]:
    """Put a synthetic case's ground truth on its prepared grid: the oracle follow-up and the new lesions.

    The generator renders the follow-up's anatomy in the initial scan's frame without motion or
    noise (``oracle_followup``), with its lesion labels. On the prepared grid this gives the
    oracle row of the evaluation (``oracle.nii.gz``, normalised like the image, zero outside the
    region) and the disease-change region (``new_lesions.nii.gz``: follow-up lesion voxels that
    are not lesions at baseline), both free of registration error. Existing files are kept.

    Args:
        folder: a complete prepared case folder.
        initial_lesions: the initial scan's lesion labels (generator output).
        oracle: the oracle follow-up in HU on the initial scan's grid.
        oracle_lesions: its lesion labels.
        window: HU window of the fixed-window normalisation (the only one the oracle supports).

    Returns:
        The written entries, ``{"oracle": path, "new_lesions": path}`` relative to the case folder's parent.
    """
    import nibabel as nib

    def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
        image = nib.load(str(path))
        return np.asarray(image.dataobj, dtype=np.float32), image.affine

    if json.loads((folder / "qc.json").read_text(encoding="utf-8")).get("normalization") != "window":
        raise ValueError(f"{folder}: the oracle is defined for the fixed-window normalisation only")
    region, grid = load(folder / "mask.nii.gz")
    if not (folder / REFERENCE_FILES["oracle"]).is_file():
        hu, affine = load(oracle)
        values = normalize_hu(resample(hu, affine, grid, region.shape, order=1, fill=AIR_HU, antialias=True), "window",
                              window)
        write_nifti(folder / REFERENCE_FILES["oracle"], np.where(region > 0, values, 0.0).astype(np.float32), grid)
    if not (folder / REFERENCE_FILES["new_lesions"]).is_file():
        before, affine = load(initial_lesions)
        after, affine_after = load(oracle_lesions)
        new = (resample(after, affine_after, grid, region.shape, order=0, fill=0.0) > 0) & \
              (resample(before, affine, grid, region.shape, order=0, fill=0.0) == 0) & (region > 0)
        write_nifti(folder / REFERENCE_FILES["new_lesions"], new.astype(np.uint8), grid)
    return {key: f"{folder.name}/{name}" for key, name in REFERENCE_FILES.items()}


def case_complete(folder: Path) -> bool:
    """Whether a prepared case folder holds every output file."""
    return all((folder / name).is_file() for name in PREPARED_FILES)


def _prepare_case(job: tuple) -> tuple[str, dict | None, dict | None, str | None, bool]:
    """Prepare (or check, if complete) one case of a cohort: a unit of work that worker processes can run.

    Returns ``(patient, item, qc, error, skipped)``: the prepared datalist entry and QC record, or the error.
    """
    preparer, cohort, out, tables, entry = job
    patient = str(entry["patient"])
    folder = out / patient
    try:
        if patient not in tables:
            raise ValueError(f"no row for patient {patient} in {cohort / 'lung_function.csv'}")
        skipped = case_complete(folder)
        if skipped:
            qc = json.loads((folder / "qc.json").read_text(encoding="utf-8"))
            # A pair prepared by an earlier run passes the same gate as a new one.
            preparer.check(qc, folder)
        else:
            if folder.exists():
                raise FileExistsError(f"{folder} exists but is incomplete; remove it to prepare this case again")
            qc = preparer(cohort / entry["initial"], cohort / entry["followup"], folder, patient)
        references = {}
        if all(k in entry for k in ("initial_lesions", "oracle_followup", "oracle_followup_lesions")):
            references = add_references(folder, cohort / entry["initial_lesions"], cohort / entry["oracle_followup"],
                                        cohort / entry["oracle_followup_lesions"])
    except Exception as e:  # one bad case must not stop the cohort; the caller reports it
        return patient, None, None, f"{type(e).__name__}: {e}", False
    item = {"patient": patient, **{k: f"{patient}/{k}.nii.gz" for k in ("image", "target", "mask", "lungs")},
            **references, **({"fold": entry["fold"]} if "fold" in entry else {}), **tables[patient]}
    return patient, item, qc, None, skipped


def prepare_cohort(cohort_dir: str | os.PathLike, prepared_dir: str | os.PathLike,
                   preparer: PairPreparer | None = None, progress: bool = True, workers: int = 1) -> dict:
    """Prepare every pair of a cohort and write the prepared datalist (layout in docs/architecture.md).

    Cases already complete are skipped (so an interrupted run resumes); a failing case is
    reported, listed in ``failures.json`` and in the returned summary, and the run goes on. A pair
    whose registration fails the QC is such a failure (its folder is kept for inspection) unless
    the preparer keeps failing pairs; a kept pair's QC failures are listed under ``warnings``.

    Args:
        cohort_dir: cohort folder with ``datalist.json`` and ``lung_function.csv``.
        prepared_dir: output folder.
        preparer: the pair preparer (default settings when ``None``).
        progress: show a tqdm progress bar.
        workers: pairs prepared at once in separate processes (ANTs runs one thread in each, so the
            results do not depend on it).

    Returns:
        ``{"datalist", "prepared", "skipped", "failed": {patient: reason}, "warnings": {patient: [...]}}``.
    """
    from tqdm import tqdm

    cohort, out = Path(cohort_dir), Path(prepared_dir)
    datalist_path = cohort / "datalist.json"
    if not datalist_path.is_file():
        raise FileNotFoundError(f"{datalist_path}: cohort datalist not found")
    cohort_list = json.loads(datalist_path.read_text(encoding="utf-8"))
    tables = read_lung_function(cohort / "lung_function.csv")
    preparer = preparer if preparer is not None else PairPreparer()
    check_output_dir(out)
    summary: dict = {"prepared": [], "skipped": [], "failed": {}, "warnings": {}}
    prepared_list: dict[str, list] = {section: [] for section in cohort_list}
    cases = [(section, entry) for section in ("training", "validation", "testing")
             for entry in cohort_list.get(section, [])]
    jobs = [(preparer, cohort, out, tables, entry) for _, entry in cases]
    pool = None
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked child would inherit the parent's torch and ITK thread state.
        pool = ProcessPoolExecutor(max_workers=int(workers), mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_prepare_case, jobs)
    else:
        results = map(_prepare_case, jobs)
    try:
        for (section, _), (patient, item, qc, error, skipped) in tqdm(zip(cases, results), total=len(cases),
                                                                      desc="prepare", unit="pair",
                                                                      disable=not progress):
            if error is not None:
                summary["failed"][patient] = error
                tqdm.write(f"prepare: {patient} FAILED: {error}")
                logger.error("preparing %s failed: %s", patient, error)
                continue
            summary["skipped" if skipped else "prepared"].append(patient)
            notes = preparer.qc_failures(qc) + list(qc.get("warnings", []))
            if notes:
                summary["warnings"][patient] = notes
            prepared_list[section].append(item)
    finally:
        if pool is not None:
            pool.shutdown()
    summary["datalist"] = str(write_json(out / "datalist.json", prepared_list))
    write_json(out / "failures.json", summary["failed"])
    if summary["failed"]:
        logger.error("%d of %d cases failed: %s", len(summary["failed"]), len(cases), ", ".join(summary["failed"]))
    return summary
