"""Left and right lung segmentation (CIResDiff Sec. 2.1, first step of target-region pre-registration).

Back ends, chosen by name:

- ``threshold`` (default, no weights): HU thresholding inside the body, removal of the air
  outside the body and of the table, removal of the trachea and main bronchi by region growing
  from the airway lumen, the two largest components, hole filling and a small closing (vessels
  and dense fibrosis stay inside), left/right from the RAS x coordinate.
- ``totalsegmentator``: TotalSegmentator's five lung lobes merged per side. It needs the
  package and its weights; both are checked before anything runs, and nothing is downloaded.

Labels follow ``custom.constants``: 1 left lung, 2 right lung.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from custom.constants import LEFT_LUNG, RIGHT_LUNG
from custom.geometry import voxel_spacing
from custom.io import CTInputError, write_json

LUNG_HU = -400.0
"""Voxels below this inside the body are lung candidates (ground glass and reticulation nets included)."""
SATELLITE_MM = 8.0
"""Air regions this close to a lung belong to it (cysts and aerated islands inside fibrosis)."""
CLOSING_MM = 4.0
"""Radius of the closing that brings dense fibrosis between aerated regions into the lung."""
SEGMENTATION_MM = 1.4
"""In-plane pixel size the threshold segmentation works at (finer scans are block-averaged to it)."""
POOLED_MIN_MATRIX = 384
"""Scans with fewer pixels across are segmented at their own resolution."""
AIRWAY_HU = -940.0
"""Airway lumen is nearly pure air; aerated lung parenchyma lies around -850 HU."""


def ball(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Ellipsoidal structuring element of a physical radius on an anisotropic grid.

    Args:
        radius_mm: radius in mm.
        spacing: voxel size in mm per axis.
    """
    half = np.maximum(np.floor(radius_mm / spacing).astype(int), 0)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-6


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Binary dilation by a physical radius: the voxels whose Euclidean distance to the mask is <= ``radius_mm``.

    The squared Euclidean distance transform is separable (Saito & Toriwaki 1994): one minimum per
    axis over the offsets along it, each adding its squared length. Only offsets of at most the
    radius along an axis can lead to a distance within the radius, so each axis pass is a minimum
    over ``2 * floor(radius / spacing) + 1`` shifted copies: exact, and about 3x faster than
    scipy's full transform on a whole scan's lungs (docs/benchmarks.md, "Adult case end to end").

    Args:
        mask: binary mask.
        radius_mm: margin in mm.
        spacing: voxel size in mm per axis.
    """
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    # Only the mask's bounding box grown by the radius can change: the distance runs there alone.
    box = expand_box(bounding_box(mask), radius_mm, spacing, mask.shape)
    squared = np.where(mask[box], np.float32(0.0), np.float32(np.inf))
    for axis, step in enumerate(np.asarray(spacing, dtype=float)):
        squared = _min_plus_along(squared, axis, step, radius_mm)
    out = np.zeros_like(mask, dtype=bool)
    # The relative margin absorbs float32 rounding of sums that equal the radius exactly.
    out[box] = squared <= np.float32(radius_mm**2 * (1.0 + 1e-6))
    return out


def _min_plus_along(squared: np.ndarray, axis: int, step: float, radius_mm: float) -> np.ndarray:
    """One axis of the separable squared distance: min over offsets k of ``squared[i + k] + (k * step)**2``.

    Args:
        squared: squared distances (mm^2) found along the previous axes (inf where none within reach).
        axis: the axis to relax along.
        step: voxel size along it in mm.
        radius_mm: offsets longer than this are not tried.
    """
    out = squared.copy()
    source, target = np.moveaxis(squared, axis, 0), np.moveaxis(out, axis, 0)
    shifted = np.empty_like(source)
    for k in range(1, min(int(np.floor(radius_mm / step * (1.0 + 1e-6))), source.shape[0] - 1) + 1):
        cost = np.float32((k * step) ** 2)
        np.add(source[:-k], cost, out=shifted[:-k])
        np.minimum(target[k:], shifted[:-k], out=target[k:])
        np.add(source[k:], cost, out=shifted[k:])
        np.minimum(target[:-k], shifted[k:], out=target[:-k])
    return out


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Index box of a mask's voxels (two passes over the array: a whole scan's mask takes ~0.1 s).

    Args:
        mask: binary mask (not empty).
    """
    columns = mask.any(axis=2)
    ranges = [np.flatnonzero(columns.any(axis=1)), np.flatnonzero(columns.any(axis=0)),
              np.flatnonzero(mask[columns.any(axis=1)].any(axis=(0, 1)))]
    return tuple(slice(int(r[0]), int(r[-1]) + 1) for r in ranges)


def expand_box(
    box: tuple[slice, ...], margin_mm: float, spacing: np.ndarray, shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """A box widened by a physical margin (rounded up to whole voxels) and clipped to the array.

    Args:
        box: index box.
        margin_mm: margin in mm.
        spacing: voxel size in mm per axis.
        shape: array size.
    """
    pad = np.ceil(margin_mm / np.asarray(spacing)).astype(int)
    return tuple(slice(max(s.start - int(p), 0), min(s.stop + int(p), n)) for s, p, n in zip(box, pad, shape))


def fill_holes(mask: np.ndarray, axial: bool = False) -> np.ndarray:
    """Fill the holes of a binary mask: background components that do not touch the array's border.

    One labelling of the background (instead of scipy's iterated dilation, seconds per volume).

    Args:
        mask: binary mask (x, y, z).
        axial: fill holes of each axial slice on its own (a lung is a hole of the body in a slice, not in 3D).
    """
    structure = ndimage.generate_binary_structure(3, 1)
    if axial:
        structure[:, :, [0, 2]] = False
    labels, _ = ndimage.label(~mask, structure=structure)
    border = [labels[[0, -1], :, :], labels[:, [0, -1], :]]
    if not axial:
        border.append(labels[:, :, [0, -1]])
    outside = np.unique(np.concatenate([b.ravel() for b in border]))
    return mask | ~np.isin(labels, outside[outside > 0]) & (labels > 0)


def component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxels of components 1..n of a label image (a histogram: far faster than per-label sums).

    Args:
        labels: output of ``ndimage.label``.
        n: number of components.
    """
    return np.bincount(labels.ravel(), minlength=n + 1)[1:]


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient's body: the largest soft-tissue component (not the table), holes filled per slice."""
    tissue = hu > -500
    labels, n = ndimage.label(tissue)
    if n == 0:
        raise CTInputError("no body found in the scan (no voxel above -500 HU)")
    sizes = component_sizes(labels, n)
    body = labels == (int(np.argmax(sizes)) + 1)
    # Lungs are holes of the body in axial slices; filling slice by slice keeps outside air out.
    return fill_holes(body, axial=True)


def airway_mask(hu: np.ndarray, body: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Trachea and main bronchi: the air-filled tube entering the top of the scan near the midline.

    Cysts and emphysema are as dark as the airway lumen, so only a component whose cross-section
    in the top 15 mm of the scan is centred on the body's midline and narrow counts as airway.
    """
    lumen = (hu < AIRWAY_HU) & body
    labels, n = ndimage.label(lumen)
    if n == 0:
        return np.zeros_like(lumen)
    top = hu.shape[2] - max(1, int(round(15.0 / spacing[2])))
    body_x = np.nonzero(body.any(axis=(1, 2)))[0]
    centre_x, width_x = body_x.mean(), (body_x.max() - body_x.min() + 1)
    keep = np.zeros(n + 1, dtype=bool)
    for index in np.unique(labels[:, :, top:]):
        if index == 0:
            continue
        xs = np.nonzero(labels[:, :, top:] == index)[0]
        if abs(xs.mean() - centre_x) < 0.1 * width_x and np.ptp(xs) < 0.2 * width_x:
            keep[index] = True
    return dilate_mm(keep[labels], 1.0, spacing)


def split_lungs(lungs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Label the two lungs left and right; a single fused component is cut at the midline.

    Args:
        lungs: binary lung mask.
        affine: voxel-to-RAS affine (x increases to the patient's left).
    """
    labels, n = ndimage.label(lungs)
    if n == 0:
        raise CTInputError("no lung found in the scan")
    sizes = component_sizes(labels, n)
    order = np.argsort(sizes)[::-1] + 1
    out = np.zeros(lungs.shape, dtype=np.uint8)
    world_x = lambda idx: (affine[:3, :3] @ np.asarray(idx, dtype=float) + affine[:3, 3])[0]  # noqa: E731
    if n >= 2 and sizes[order[1] - 1] > 0.2 * sizes[order[0] - 1]:
        centres = ndimage.center_of_mass(lungs, labels, [int(c) for c in order[:2]])
        middle = world_x(ndimage.center_of_mass(lungs))
        for comp, centre in zip(order[:2], centres):
            out[labels == comp] = LEFT_LUNG if world_x(centre) > middle else RIGHT_LUNG
        if len(np.unique(out)) != 3:
            raise CTInputError("the two largest air components lie on the same side: cannot tell left from right lung")
        return out
    largest = labels == order[0]
    idx = np.stack(np.nonzero(largest), 1)
    x_world = idx @ affine[:3, :3].T[:, 0] + affine[0, 3]
    midline = np.median(x_world)
    out[tuple(idx[x_world > midline].T)] = LEFT_LUNG
    out[tuple(idx[x_world <= midline].T)] = RIGHT_LUNG
    return out


def segment_lungs_threshold(hu: np.ndarray, affine: np.ndarray, min_lung_ml: float = 5.0) -> np.ndarray:
    """Weight-free lung segmentation (labels 1 left, 2 right).

    On a whole-chest scan (at least ``POOLED_MIN_MATRIX`` pixels across), pixels finer than
    ``SEGMENTATION_MM`` are averaged in blocks first and the labels are repeated back: a 512 x 512
    slice of 0.7 mm pixels is segmented at 1.4 mm, four times faster (adult phantom: Dice 0.980
    against 0.985 at full resolution, below the 2 mm grid the model sees). Small fields of view
    keep their pixels: there a block is a larger share of the lung.

    Args:
        hu: CT in Hounsfield units, (x, y, z).
        affine: voxel-to-RAS affine.
        min_lung_ml: a lung smaller than this is treated as not found.
    """
    factor = max(1, int(round(SEGMENTATION_MM / float(voxel_spacing(affine)[:2].max()))))
    if factor == 1 or min(hu.shape[:2]) < POOLED_MIN_MATRIX:
        return _segment_lungs_threshold(hu, affine, min_lung_ml)
    nx, ny = (n // factor * factor for n in hu.shape[:2])
    pooled = hu[:nx, :ny].reshape(nx // factor, factor, ny // factor, factor, -1).mean(axis=(1, 3), dtype=np.float32)
    pooled_affine = np.array(affine, dtype=float) @ np.diag([factor, factor, 1.0, 1.0])
    pooled_affine[:3, 3] = (np.asarray(affine) @ [(factor - 1) / 2.0, (factor - 1) / 2.0, 0.0, 1.0])[:3]
    labels = np.repeat(np.repeat(_segment_lungs_threshold(pooled, pooled_affine, min_lung_ml), factor, 0), factor, 1)
    return np.pad(labels, [(0, hu.shape[0] - nx), (0, hu.shape[1] - ny), (0, 0)], mode="edge")


def _segment_lungs_threshold(hu: np.ndarray, affine: np.ndarray, min_lung_ml: float) -> np.ndarray:
    spacing = voxel_spacing(affine)
    body = body_mask(hu)
    candidate = (hu < LUNG_HU) & body
    # Air touching the sides of the field of view is outside the patient even if enclosed in a slice.
    candidate[[0, -1], :, :] = candidate[:, [0, -1], :] = False
    candidate &= ~airway_mask(hu, body, spacing)
    labels, n = ndimage.label(candidate)
    if n == 0:
        raise CTInputError("no lung found in the scan (no air-filled region inside the body)")
    sizes = component_sizes(labels, n)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    keep = np.argsort(sizes)[::-1][:2] + 1
    keep = [k for k in keep if sizes[k - 1] * voxel_ml >= min_lung_ml]
    if not keep:
        raise CTInputError(f"no lung found in the scan (largest air region {sizes.max() * voxel_ml:.1f} ml)")
    lungs = np.isin(labels, keep)
    # Honeycomb cysts and ground-glass islands cut off by dense fibrosis are separate components:
    # take back the air-filled ones close to a lung, then close over the dense walls between them.
    near = dilate_mm(lungs, SATELLITE_MM, spacing)
    satellites = np.unique(labels[near & candidate & ~lungs])
    lungs |= np.isin(labels, satellites[satellites > 0])
    # Closing and hole filling change nothing outside the lungs' box grown by the closing radius.
    box = expand_box(bounding_box(lungs), CLOSING_MM + float(spacing.max()), spacing, lungs.shape)
    inner = lungs[box]
    inner = ndimage.binary_closing(inner, ball(CLOSING_MM, spacing), border_value=0) | inner
    lungs[box] = fill_holes(inner) & body[box]
    return split_lungs(lungs, affine)


TOTALSEG_LEFT = ("lung_upper_lobe_left", "lung_lower_lobe_left")
TOTALSEG_RIGHT = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
TOTALSEG_INSTALL = (
    "TotalSegmentator and its weights are needed for the 'totalsegmentator' back end. Install them with:\n"
    "  pip install --constraint <file pinning your torch version> 'cirresdiff-bundle[totalsegmentator]'\n"
    "  totalseg_download_weights -t total_fast   (or: totalseg_import_weights -i <weights.zip>)\n"
    "and set TOTALSEG_HOME_DIR if the weights are not under ~/.totalsegmentator. "
    "Or use the weight-free default: --segmenter threshold"
)


def totalsegmentator_weights_dir() -> Path:
    """Where TotalSegmentator keeps its weights (``TOTALSEG_WEIGHTS_PATH`` or ``TOTALSEG_HOME_DIR``/nnunet/results)."""
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    home = Path(os.environ.get("TOTALSEG_HOME_DIR", Path.home() / ".totalsegmentator"))
    return home / "nnunet" / "results"


def check_totalsegmentator(fast: bool = True) -> None:
    """Fail at once, with install instructions, when TotalSegmentator or its weights are missing.

    TotalSegmentator would otherwise try to download the weights at run time (and leave an empty
    folder behind when offline).

    Args:
        fast: check the weights of the 3 mm fast model (tasks 297 and 298) instead of the full one.
    """
    try:
        import totalsegmentator  # noqa: F401
    except ImportError as e:
        raise RuntimeError(TOTALSEG_INSTALL) from e
    tasks = (("Dataset297", "Dataset298") if fast
             else ("Dataset291", "Dataset292", "Dataset293", "Dataset294", "Dataset295"))
    root = totalsegmentator_weights_dir()
    found = {t for t in tasks
             if root.is_dir() and any(p.name.startswith(t) and any(p.rglob("*.pth")) for p in root.iterdir())}
    if found != set(tasks):
        raise RuntimeError(f"TotalSegmentator weights missing in {root} "
                           f"(need {', '.join(sorted(set(tasks) - found))}).\n{TOTALSEG_INSTALL}")


def disable_usage_stats() -> Path:
    """Set ``send_usage_stats`` to false in TotalSegmentator's config.json, so a run makes no network call.

    TotalSegmentator creates that file with usage statistics switched on when it is absent.
    """
    home = Path(os.environ.get("TOTALSEG_HOME_DIR", Path.home() / ".totalsegmentator"))
    path = home / "config.json"
    config = (json.loads(path.read_text(encoding="utf-8")) if path.is_file()
              else {"totalseg_id": "cirresdiff", "prediction_counter": 0})
    if config.get("send_usage_stats") is not False:
        config["send_usage_stats"] = False
        write_json(path, config)
    return path


def run_totalsegmentator(hu: np.ndarray, affine: np.ndarray, fast: bool) -> dict[str, np.ndarray]:
    """Run TotalSegmentator's lung lobes on a volume; returns one binary mask per lobe name.

    TotalSegmentator reorients to its canonical frame internally and returns labels on the
    input's own grid; the shape is checked so a mismatch cannot pass silently.

    Args:
        hu: CT in Hounsfield units, (x, y, z).
        affine: voxel-to-RAS affine.
        fast: use the 3 mm fast model.
    """
    import nibabel as nib
    import torch
    from totalsegmentator.map_to_binary import class_map
    from totalsegmentator.python_api import totalsegmentator

    image = nib.Nifti1Image(hu.astype(np.float32), affine)
    result = totalsegmentator(image, None, fast=fast, roi_subset=list(TOTALSEG_LEFT + TOTALSEG_RIGHT), ml=True,
                              quiet=True, skip_saving=True, device="gpu" if torch.cuda.is_available() else "cpu")
    labels = np.asarray(result.dataobj)
    if labels.shape != hu.shape:
        raise RuntimeError(f"TotalSegmentator returned labels of shape {labels.shape} for an image of shape {hu.shape}")
    # Label ids come from TotalSegmentator's own map (task "total"), not from a copy of it.
    ids = {name: index for index, name in class_map["total"].items()}
    return {name: labels == ids[name] for name in TOTALSEG_LEFT + TOTALSEG_RIGHT}


def segment_lungs_totalsegmentator(hu: np.ndarray, affine: np.ndarray, fast: bool = True) -> np.ndarray:
    """Lung labels from TotalSegmentator's lobes: left = upper + lower left, right = the three right lobes.

    Args:
        hu: CT in Hounsfield units, (x, y, z).
        affine: voxel-to-RAS affine.
        fast: use the 3 mm fast model.
    """
    check_totalsegmentator(fast)
    disable_usage_stats()
    lobes = run_totalsegmentator(hu, affine, fast)
    out = np.zeros(hu.shape, dtype=np.uint8)
    out[np.any([lobes[n] for n in TOTALSEG_LEFT], axis=0)] = LEFT_LUNG
    out[np.any([lobes[n] for n in TOTALSEG_RIGHT], axis=0)] = RIGHT_LUNG
    if not (out == LEFT_LUNG).any() or not (out == RIGHT_LUNG).any():
        raise CTInputError("TotalSegmentator found no lung on one side")
    return out


def segment_lungs(hu: np.ndarray, affine: np.ndarray, segmenter: str = "threshold", fast: bool = True) -> np.ndarray:
    """Segment left and right lungs with the named back end.

    Args:
        hu: CT in Hounsfield units, (x, y, z).
        affine: voxel-to-RAS affine.
        segmenter: ``"threshold"`` or ``"totalsegmentator"``.
        fast: TotalSegmentator's 3 mm fast model (ignored by ``threshold``).
    """
    if segmenter == "threshold":
        return segment_lungs_threshold(hu, affine)
    if segmenter == "totalsegmentator":
        return segment_lungs_totalsegmentator(hu, affine, fast=fast)
    raise ValueError(f"unknown segmenter {segmenter!r}; choose 'threshold' or 'totalsegmentator'")
