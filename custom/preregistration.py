"""Target-region pre-registration (CIResDiff Sec. 2.1) as MONAI transforms and a batch driver.

For a pair (initial, follow-up): load and check both CTs, segment left and right lungs, register
each follow-up lung to the initial one (ANTs affine) and merge, then cut the dilated lung region
out on a 1 x 1 x 1 mm grid of fixed size centred on it, and map HU to [0, 1].

The transforms are usable from configs:

- preparation (``configs/prepare.json``): ``LoadCTd`` -> ``SegmentLungsd`` -> ``RegisterLungsd``
  -> ``LungRegionToGridd``;
- inference preprocessing (initial scan only): ``LoadCTd`` -> ``SegmentLungsd`` ->
  ``LungRegionToGridd``; ``GridToSourced`` maps the generated follow-up back into the initial
  scan's space afterwards.

Intensities: a fixed HU window (``constants.HU_WINDOW``) by default, or per-scan min-max after
clipping the scanner padding (the paper's choice); docs/preregistration.md compares them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform
from scipy import ndimage

from custom.constants import HU_WINDOW
from custom.io import CTInputError, load_ct, write_json, write_nifti
from custom.registration import register_pair
from custom.segmentation import dilate_mm, segment_lungs, voxel_spacing
from custom.text import read_lung_function

logger = logging.getLogger(__name__)


def normalize_hu(hu: np.ndarray, mode: str = "window", window: Sequence[float] = HU_WINDOW, region: np.ndarray | None = None) -> np.ndarray:
    """Map HU to [0, 1]: a fixed window, or min-max of the scan (inside ``region`` when given).

    Args:
        hu: Hounsfield units (scanner padding already clipped).
        mode: ``"window"`` or ``"minmax"``.
        window: (low, high) HU of the fixed window.
        region: voxels whose range defines min-max.
    """
    if mode == "window":
        low, high = window
    elif mode == "minmax":
        values = hu[region] if region is not None and region.any() else hu
        low, high = float(values.min()), float(values.max())
    else:
        raise ValueError(f"unknown normalization {mode!r}: use 'window' or 'minmax'")
    return np.clip((hu - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def denormalize(values: np.ndarray, window: Sequence[float] = HU_WINDOW) -> np.ndarray:
    """Inverse of the fixed-window normalisation: [0, 1] back to HU.

    Args:
        values: intensities in [0, 1].
        window: (low, high) HU of the fixed window.
    """
    low, high = window
    return values * (high - low) + low


def grid_affine(centre_ras: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """RAS affine of an axis-aligned 1 mm grid of ``grid`` voxels centred on ``centre_ras``.

    Args:
        centre_ras: centre of the grid in mm.
        grid: voxels per axis.
    """
    affine = np.eye(4)
    affine[:3, 3] = np.asarray(centre_ras) - (np.asarray(grid) - 1) / 2.0
    return affine


def resample(array: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray, shape: Sequence[int], order: int, fill: float) -> np.ndarray:
    """Resample ``array`` onto another grid by physical position.

    Args:
        array: source voxels (x, y, z).
        source_affine: its RAS affine.
        target_affine: RAS affine of the target grid.
        shape: target grid size.
        order: interpolation order (0 nearest, 1 linear).
        fill: value outside the source.
    """
    mapping = np.linalg.inv(source_affine) @ target_affine
    return ndimage.affine_transform(array, mapping[:3, :3], offset=mapping[:3, 3], output_shape=tuple(shape),
                                    order=order, mode="constant", cval=fill)


def _as_meta(array: np.ndarray, affine: np.ndarray, meta: Mapping | None = None) -> MetaTensor:
    out = MetaTensor(np.asarray(array)[None], affine=affine)
    if meta is not None:
        out.meta.update({k: v for k, v in meta.items() if k not in ("affine", "original_affine", "spatial_shape")})
    out.meta["spatial_shape"] = np.asarray(array.shape)
    return out


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
            source = d[key]
            hu, affine = load_ct(source)
            d[key] = _as_meta(hu, affine, {"filename_or_obj": str(source)})
        return d


class SegmentLungsd(MapTransform):
    """Segment left and right lungs of each CT into ``<key>_lungs`` (1 left, 2 right).

    Args:
        keys: keys of HU images.
        segmenter: ``"threshold"`` or ``"totalsegmentator"``.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, segmenter: str = "threshold", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.segmenter = segmenter

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            try:
                labels = segment_lungs(np.asarray(image[0]), np.asarray(image.affine), self.segmenter)
            except CTInputError as e:
                raise CTInputError(f"{image.meta.get('filename_or_obj', key)}: {e}") from e
            d[f"{key}_lungs"] = _as_meta(labels, np.asarray(image.affine))
        return d


class RegisterLungsd(MapTransform):
    """Register the follow-up lungs to the initial lungs (per lung, ANTs affine) and merge onto the initial grid.

    Replaces ``moving_key`` by the aligned follow-up and adds ``registration`` (transforms and QC)
    and ``<moving_key>_unregistered`` (the follow-up resampled without registration, for the QC figure).

    Args:
        fixed_key: key of the initial scan (its lungs under ``<fixed_key>_lungs``).
        moving_key: key of the follow-up scan (its lungs under ``<moving_key>_lungs``).
        margin_mm: dilation of the lung masks.
        transform_type: ANTs transform type (``"Affine"`` or ``"AffineFast"``).
        seed: seed of ANTs' random sampling.
    """

    def __init__(self, fixed_key: str = "image", moving_key: str = "target", margin_mm: float = 10.0,
                 transform_type: str = "Affine", seed: int = 0) -> None:
        super().__init__([fixed_key, moving_key])
        self.fixed_key, self.moving_key = fixed_key, moving_key
        self.margin_mm, self.transform_type, self.seed = margin_mm, transform_type, seed

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        fixed, moving = d[self.fixed_key], d[self.moving_key]
        affine = np.asarray(fixed.affine)
        result = register_pair(
            np.asarray(fixed[0]), affine, np.asarray(d[f"{self.fixed_key}_lungs"][0]),
            np.asarray(moving[0]), np.asarray(moving.affine), np.asarray(d[f"{self.moving_key}_lungs"][0]),
            margin_mm=self.margin_mm, transform_type=self.transform_type, seed=self.seed,
        )
        d[self.moving_key] = _as_meta(result["aligned"], affine, moving.meta)
        d[f"{self.moving_key}_unregistered"] = _as_meta(result["unregistered"], affine)
        d["registration"] = {"transforms": result["transforms"], "qc": result["qc"]}
        return d


class LungRegionToGridd(MapTransform):
    """Cut the dilated lung region out on a 1 mm grid of fixed size and map HU to [0, 1].

    Writes the region mask under ``mask_key``; voxels outside the region are set to 0 (air) in
    every image, so the model sees exactly the target region. The source geometry is kept in the
    images' metadata for ``GridToSourced``.

    Args:
        keys: keys of HU images on the initial scan's grid.
        lungs_key: key of the initial scan's lung labels.
        mask_key: key receiving the region mask.
        margin_mm: dilation of the lungs defining the region.
        grid: voxels of the output grid (1 mm each).
        normalization: ``"window"`` or ``"minmax"``.
        window: HU window of the ``"window"`` normalisation.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, lungs_key: str = "image_lungs", mask_key: str = "mask",
                 margin_mm: float = 10.0, grid: Sequence[int] = (96, 96, 96), normalization: str = "window",
                 window: Sequence[float] = HU_WINDOW) -> None:
        super().__init__(keys)
        self.lungs_key, self.mask_key = lungs_key, mask_key
        self.margin_mm, self.grid = margin_mm, tuple(int(g) for g in grid)
        self.normalization, self.window = normalization, tuple(window)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        lungs = d[self.lungs_key]
        source_affine = np.asarray(lungs.affine)
        spacing = voxel_spacing(source_affine)
        region = dilate_mm(np.asarray(lungs[0]) > 0, self.margin_mm, spacing)
        idx = np.stack(np.nonzero(region), 1)
        centre_vox = (idx.min(0) + idx.max(0)) / 2.0
        centre = source_affine[:3, :3] @ centre_vox + source_affine[:3, 3]
        target_affine = grid_affine(centre, self.grid)
        mask = resample(region.astype(np.float32), source_affine, target_affine, self.grid, order=1, fill=0.0) > 0.5
        extent_mm = (idx.max(0) - idx.min(0) + 1) * spacing
        d["grid_coverage"] = float(mask.sum() * 1.0 / max(region.sum() * np.prod(spacing), 1e-6))
        for key in self.key_iterator(d):
            image = d[key]
            hu = resample(np.asarray(image[0], dtype=np.float32), np.asarray(image.affine), target_affine, self.grid,
                          order=1, fill=-1024.0)
            values = np.where(mask, normalize_hu(hu, self.normalization, self.window, mask), 0.0).astype(np.float32)
            out = _as_meta(values, target_affine, image.meta)
            out.meta.update({"source_affine": source_affine, "source_shape": np.asarray(image.shape[1:]),
                             "region_extent_mm": extent_mm})
            d[key] = out
        d[self.mask_key] = _as_meta(mask.astype(np.uint8), target_affine)
        return d


class GridToSourced(MapTransform):
    """Map a generated follow-up from the model's grid back into the initial scan's space, in HU.

    Inside the lung region the generated intensities (window-denormalised) replace the initial
    scan's; outside it the initial scan is kept, so the output is a whole follow-up CT.

    Args:
        keys: keys of grid images in [0, 1] (e.g. ``pred``).
        source_key: key of the initial scan in HU on its own grid (kept by the preprocessing).
        mask_key: key of the region mask on the model's grid.
        window: HU window used by the normalisation.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, source_key: str = "image_hu", mask_key: str = "mask",
                 window: Sequence[float] = HU_WINDOW) -> None:
        super().__init__(keys)
        self.source_key, self.mask_key, self.window = source_key, mask_key, tuple(window)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        source = d[self.source_key]
        source_affine, shape = np.asarray(source.affine), source.shape[1:]
        grid_aff = np.asarray(d[self.mask_key].affine)
        region = resample(np.asarray(d[self.mask_key][0], dtype=np.float32), grid_aff, source_affine, shape, 1, 0.0) > 0.5
        for key in self.key_iterator(d):
            pred = np.asarray(d[key].detach().cpu() if hasattr(d[key], "detach") else d[key], dtype=np.float32)
            channels = []
            for channel in pred:
                back = resample(channel, grid_aff, source_affine, shape, order=1, fill=0.0)
                channels.append(np.where(region, denormalize(back, self.window), np.asarray(source[0])))
            d[key] = MetaTensor(np.stack(channels).astype(np.float32), affine=source_affine, meta=dict(source.meta))
        return d


def qc_figure(path: Path, initial: np.ndarray, before: np.ndarray, after: np.ndarray, lungs: np.ndarray, title: str) -> None:
    """Registration QC picture: initial, follow-up before and after, and a checkerboard, three planes.

    Args:
        path: destination PNG (written atomically).
        initial: initial scan HU.
        before: follow-up resampled without registration.
        after: follow-up after per-lung registration.
        lungs: initial lung labels (chooses the slices).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = [int(c) for c in ndimage.center_of_mass(lungs > 0)]
    # The sagittal plane goes through one lung, not through the mediastinum between them.
    centre[0] = int(ndimage.center_of_mass(lungs == lungs.max())[0])
    tile = max(4, min(initial.shape) // 8)
    checker = ((np.indices(initial.shape) // tile).sum(0) % 2).astype(bool)
    columns = [("initial", initial), ("follow-up, unregistered", before), ("follow-up, registered", after),
               ("checkerboard initial / registered", np.where(checker, initial, after))]
    fig, axes = plt.subplots(3, 4, figsize=(12, 9), layout="constrained")
    planes = [(lambda v: np.rot90(v[:, :, centre[2]]), "axial"), (lambda v: np.rot90(v[:, centre[1], :]), "coronal"),
              (lambda v: np.rot90(v[centre[0], :, :]), "sagittal")]
    for row, (cut, plane) in enumerate(planes):
        for col, (name, volume) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(cut(volume), cmap="gray", vmin=-1000, vmax=200, aspect="auto")
            ax.contour(cut(lungs > 0), levels=[0.5], colors="yellow", linewidths=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(plane)
    fig.suptitle(title, fontsize=10)
    fd, tmp = tempfile.mkstemp(prefix=".qc.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def preparation_transform(segmenter: str = "threshold", margin_mm: float = 10.0, grid: Sequence[int] = (96, 96, 96),
                          normalization: str = "window", transform_type: str = "Affine", seed: int = 0) -> Compose:
    """The pair-preparation chain: load, segment, register, cut the region onto the grid.

    Args:
        segmenter: lung segmentation back end.
        margin_mm: dilation of the lungs (registration masks and region).
        grid: voxels of the output grid (1 mm).
        normalization: ``"window"`` or ``"minmax"``.
        transform_type: ANTs transform type.
        seed: seed of ANTs' random sampling.
    """
    return Compose([
        LoadCTd(keys=["image", "target"]),
        SegmentLungsd(keys=["image", "target"], segmenter=segmenter),
        RegisterLungsd("image", "target", margin_mm=margin_mm, transform_type=transform_type, seed=seed),
        LungRegionToGridd(keys=["image", "target"], lungs_key="image_lungs", margin_mm=margin_mm, grid=grid,
                          normalization=normalization),
    ], map_items=False)


def prepare_pair(initial: str | os.PathLike, followup: str | os.PathLike, out_dir: str | os.PathLike,
                 segmenter: str = "threshold", margin_mm: float = 10.0, grid: Sequence[int] = (96, 96, 96),
                 normalization: str = "window", transform_type: str = "Affine", seed: int = 0) -> dict:
    """Prepare one pair into ``out_dir``: image, target, mask (NIfTI), qc.json and qc.png.

    The folder appears only when complete (written under a temporary name, then renamed).

    Args:
        initial: initial CT (DICOM folder or image file).
        followup: follow-up CT of the same patient.
        out_dir: output folder (must not exist yet).
        segmenter: ``"threshold"`` or ``"totalsegmentator"``.
        margin_mm: dilation of the lungs.
        grid: voxels of the output grid (1 mm).
        normalization: ``"window"`` or ``"minmax"``.
        transform_type: ANTs transform type.
        seed: seed of ANTs' random sampling.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    times = {}
    start = time.perf_counter()
    chain = preparation_transform(segmenter, margin_mm, grid, normalization, transform_type, seed)
    d = {"image": str(initial), "target": str(followup)}
    for transform in chain.transforms:
        if isinstance(transform, LungRegionToGridd):
            # The full-resolution pair on the initial grid, before cropping, is what the QC figure shows.
            figure_inputs = [np.asarray(d[k][0]) for k in ("image", "target_unregistered", "target", "image_lungs")]
        t0 = time.perf_counter()
        d = transform(d)
        times[type(transform).__name__] = round(time.perf_counter() - t0, 3)
    if float(np.asarray(d["mask"]).sum()) == 0:
        raise CTInputError(f"{initial}: empty lung region after resampling")
    qc = {"initial": str(initial), "followup": str(followup), "segmenter": segmenter, "margin_mm": margin_mm,
          "grid": list(grid), "normalization": normalization, **d["registration"],
          "region_extent_mm": np.asarray(d["image"].meta["region_extent_mm"]).round(1).tolist(),
          "region_inside_grid": round(d["grid_coverage"], 4), "seconds": times}
    worst = min(v["dice_after"] for v in qc["qc"].values())
    qc["warnings"] = []
    if worst < 0.8:
        qc["warnings"].append(f"lung Dice after registration {worst:.2f} < 0.80: different patients or failed registration?")
    if d["grid_coverage"] < 0.98:
        qc["warnings"].append(f"the grid holds only {100 * d['grid_coverage']:.1f} % of the lung region: use a larger grid")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for key in ("image", "target"):
            write_nifti(tmp / f"{key}.nii.gz", np.asarray(d[key][0], dtype=np.float32), np.asarray(d[key].affine))
        write_nifti(tmp / "mask.nii.gz", np.asarray(d["mask"][0], dtype=np.uint8), np.asarray(d["mask"].affine))
        initial_hu, before, after, lungs = figure_inputs
        qc_figure(tmp / "qc.png", initial_hu, before, after, lungs, f"{Path(initial).parent.name}: registration QC")
        qc["seconds"]["total"] = round(time.perf_counter() - start, 3)
        write_json(tmp / "qc.json", qc)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return qc


def prepare_cohort(cohort_dir: str | os.PathLike, out_dir: str | os.PathLike, grid: Sequence[int] = (96, 96, 96),
                   segmenter: str = "threshold", margin_mm: float = 10.0, normalization: str = "window",
                   transform_type: str = "Affine", seed: int = 0, progress: bool = True) -> Path:
    """Prepare every pair of a cohort (datalist.json + lung_function.csv) and write the prepared datalist.

    Cases already prepared are skipped, so an interrupted run resumes; a failing case is reported
    (in ``failures.json`` and the log) and skipped, never dropped silently.

    Args:
        cohort_dir: cohort folder (the synthetic cohort's layout, docs/architecture.md).
        out_dir: prepared dataset folder.
        grid: voxels of the output grid (1 mm).
        segmenter: ``"threshold"`` or ``"totalsegmentator"``.
        margin_mm: dilation of the lungs.
        normalization: ``"window"`` or ``"minmax"``.
        transform_type: ANTs transform type.
        seed: seed of ANTs' random sampling.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    cohort, out = Path(cohort_dir), Path(out_dir)
    datalist_path = cohort / "datalist.json"
    if not datalist_path.is_file():
        raise FileNotFoundError(f"no datalist.json in {cohort}")
    source = json.loads(datalist_path.read_text())
    tables = read_lung_function(cohort / "lung_function.csv")
    out.mkdir(parents=True, exist_ok=True)
    prepared: dict[str, list] = {"training": [], "testing": []}
    failures = {}
    cases = [(section, entry) for section in ("training", "testing") for entry in source[section]]
    for section, entry in tqdm(cases, desc="pre-registration", disable=not progress):
        pid = entry["patient"]
        case_dir = out / pid
        try:
            if pid not in tables:
                raise KeyError(f"patient {pid} has no row in {cohort / 'lung_function.csv'}")
            if not (case_dir / "qc.json").is_file():
                prepare_pair(cohort / entry["initial"], cohort / entry["followup"], case_dir, segmenter, margin_mm,
                             grid, normalization, transform_type, seed)
        except Exception as e:  # one bad case must not stop the cohort; it is reported below
            failures[pid] = f"{type(e).__name__}: {e}"
            logger.error(f"pre-registration failed for {pid}: {e}\n{traceback.format_exc(limit=3)}")
            continue
        follow = tables[pid]["followup"]
        item = {"patient": pid, "image": f"{pid}/image.nii.gz", "target": f"{pid}/target.nii.gz",
                "mask": f"{pid}/mask.nii.gz", "record": tables[pid]["record"], "followup_record": follow}
        if "Progression" in follow:
            item["progression"] = int(follow["Progression"])
        if "fold" in entry:
            item["fold"] = entry["fold"]
        prepared[section].append(item)
    write_json(out / "failures.json", failures)
    if failures:
        logger.warning(f"{len(failures)} case(s) failed and were skipped (see {out / 'failures.json'}): {sorted(failures)}")
    if not prepared["training"]:
        raise RuntimeError(f"no training case could be prepared from {cohort}; see {out / 'failures.json'}")
    return write_json(out / "datalist.json", prepared)
