"""Per-lung affine registration of the follow-up onto the initial scan (CIResDiff Sec. 2.1).

Breathing and posture move each lung differently, so each lung of the follow-up is registered to
the same lung of the initial scan on its own, with an ANTs affine transform, and the two aligned
lungs are merged:

- a voxel inside one lung's dilated region takes that lung's aligned follow-up;
- a voxel inside both dilated regions (the mediastinum between close lungs) takes the lung whose
  undilated mask is nearer, so every voxel comes from exactly one rigidly consistent transform.

How one lung is registered (measurements behind each choice: docs/preregistration.md):

1. Both scans are cut to a box around the lung (the initial lung plus the metric margin, the
   follow-up lung plus ``SEARCH_MARGIN_MM``) and resampled to ``registration_spacing_mm``
   isotropic voxels (finer for a lung less than ``VOXELS_ACROSS_LUNG`` voxels across) after an
   anti-aliasing blur: an adult lung at 2 mm still has ~300 000 voxels, and the registration runs
   ~10 times faster than on the whole scan at full resolution.
2. The transform starts from the translation between the centroids of the two lung masks.
3. ANTs optimises an affine transform (Mattes mutual information, 3 levels), the metric
   restricted by the *initial* lung's mask dilated by ``metric_margin_mm`` only. A follow-up
   mask as well made the valid overlap of the two boundary bands vanish as soon as the lung had
   moved by more than the margin, and ANTs settled on a degenerate transform.
4. The follow-up is resampled onto the initial grid with the result, at full resolution, only
   inside the boxes that the merge and the QC need.

Arrays are (x, y, z) with RAS affines; ANTs works in ITK's LPS frame, converted explicitly.

Determinism: ANTs seeds its metric sampling from the clock unless given a non-zero seed, and
Mattes mutual information summed over several threads differs from run to run, so ANTs runs
single-threaded here (on 2 busy cores it is also faster) with a fixed non-zero seed.
"""

from __future__ import annotations

import os

# ITK reads its default thread count once, when ANTs first builds a filter: set it before that.
os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"

import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import ants  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from custom.constants import AIR_HU, LUNG_LABELS  # noqa: E402
from custom.geometry import voxel_spacing  # noqa: E402
from custom.io import LPS_TO_RAS  # noqa: E402
from custom.segmentation import bounding_box, dilate_mm, expand_box  # noqa: E402

SEARCH_MARGIN_MM = 30.0
"""The follow-up is cut this far around its lung: after the centroid start, the rest of an 8-degree
rotation moves the apex of an adult lung by ~18 mm, and points mapped outside the box are lost."""
LEVELS = {"shrink_factors": (4, 2, 1), "smoothing_sigmas": (2, 1, 0), "iterations": (1000, 500, 250)}
"""ANTs' multi-resolution schedule on the resampled images (sigmas in voxels); every level stops at
ANTs' convergence test (slope < 1e-6 over 10 iterations) long before its iteration cap."""
METRIC_SAMPLING = 0.2
"""Share of the masked voxels ANTs samples per iteration. At 0.05 the coarsest level of a lung had no
sample left and ANTs returned its starting transform without an error."""
VOXELS_ACROSS_LUNG = 30
"""The registration voxel is at most 1/30 of the lung's narrowest extent: 2 mm left the quarter-size demo
lungs (~30 mm wide) 15 voxels across and their error at 0.49 mm, 1 mm brought it to 0.24 mm."""
TRANSFORM_TYPES = ("Affine", "Similarity", "Rigid")
"""ANTs linear transforms the schedule above is used with."""


class RegistrationError(RuntimeError):
    """ANTs could not register a lung (it stopped without moving from its starting transform)."""


@contextmanager
def ants_seed(seed: int) -> Iterator[None]:
    """Fix the seed of ANTs' random metric sampling for the duration of a block.

    antspyx passes ``ants.config._random_seed`` to antsRegistration as ``--random-seed``; ANTs
    treats 0 as "seed from the clock", hence the check.

    Args:
        seed: a positive integer.
    """
    if int(seed) <= 0:
        raise ValueError(f"the ANTs seed must be a positive integer (0 means a clock seed in ANTs), got {seed}")
    previous = ants.config._random_seed
    ants.config._random_seed = int(seed)
    try:
        yield
    finally:
        ants.config._random_seed = previous


def to_ants(array: np.ndarray, affine: np.ndarray) -> ants.ANTsImage:
    """An (x, y, z) array with a RAS affine as an ANTs image in LPS physical space.

    Args:
        array: voxel data.
        affine: voxel-to-RAS affine.
    """
    lps = LPS_TO_RAS @ affine
    spacing = voxel_spacing(affine)
    return ants.from_numpy(
        np.ascontiguousarray(array, dtype=np.float32), origin=tuple(lps[:3, 3]), spacing=tuple(spacing),
        direction=lps[:3, :3] / spacing,
    )


def read_affine_ras(path: str) -> np.ndarray:
    """An ANTs/ITK affine transform file as a 4x4 RAS matrix mapping fixed-space points to moving-space points.

    ITK stores T(p) = A (p - c) + c + t in LPS; RAS = D LPS with D = diag(-1, -1, 1).

    Args:
        path: the transform file (``.mat``).
    """
    transform = ants.read_transform(path)
    params = np.asarray(transform.parameters, dtype=float)
    centre = np.asarray(transform.fixed_parameters, dtype=float)
    matrix = params[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = params[9:12] + centre - matrix @ centre
    return LPS_TO_RAS @ lps @ LPS_TO_RAS


def write_affine_ras(path: str, matrix: np.ndarray) -> None:
    """Write a 4x4 RAS matrix (fixed point -> moving point) as an ITK affine file (read by ``read_affine_ras``).

    Args:
        path: destination (``.mat``).
        matrix: RAS affine.
    """
    lps = LPS_TO_RAS @ np.asarray(matrix, dtype=float) @ LPS_TO_RAS
    transform = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=lps[:3, :3],
                                           translation=tuple(lps[:3, 3]), center=(0.0, 0.0, 0.0))
    ants.write_transform(transform, path)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two sets of intensities."""
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-12))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks."""
    return float(2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def rotation_degrees(matrix: np.ndarray) -> float:
    """Angle of the rotation part of a 4x4 affine (its polar decomposition), in degrees."""
    u, _, vt = np.linalg.svd(np.asarray(matrix, dtype=float)[:3, :3])
    return float(np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1.0) / 2.0, -1.0, 1.0))))


def box_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """RAS affine of the sub-array ``array[box]``.

    Args:
        affine: affine of the whole array.
        box: index box.
    """
    out = np.array(affine, dtype=float)
    out[:3, 3] = affine[:3, :3] @ np.array([s.start for s in box], dtype=float) + affine[:3, 3]
    return out


def registration_image(hu: np.ndarray, affine: np.ndarray, box: tuple[slice, ...], spacing_mm: float) -> ants.ANTsImage:
    """A box of a scan resampled to isotropic voxels, blurred first so coarser voxels do not alias vessels.

    The blur's FWHM is sqrt(target^2 - source^2) per axis: the resolution of the target voxel.

    Args:
        hu: the scan, HU.
        affine: its RAS affine.
        box: index box to keep.
        spacing_mm: isotropic voxel size of the result.
    """
    spacing = voxel_spacing(affine)
    sigma = np.sqrt(np.maximum(spacing_mm**2 - spacing**2, 0.0)) / (2.0 * np.sqrt(2.0 * np.log(2.0))) / spacing
    array = ndimage.gaussian_filter(np.asarray(hu[box], dtype=np.float32), sigma)
    return ants.resample_image(to_ants(array, box_affine(affine, box)), (spacing_mm,) * 3, use_voxels=False,
                               interp_type=0)


def registration_mask(mask: np.ndarray, affine: np.ndarray, like: ants.ANTsImage) -> ants.ANTsImage:
    """A binary mask on the grid of a registration image (linear, then > 0.5).

    Args:
        mask: binary mask on a box of the scan's grid.
        affine: RAS affine of that box.
        like: the registration image.
    """
    image = to_ants(mask.astype(np.float32), affine)
    return ants.resample_image_to_target(image, like, interp_type="linear") > 0.5


def centroid_ras(mask: np.ndarray, affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Centre of mass of a mask, in RAS mm, computed in a box holding it.

    Args:
        mask: binary mask.
        affine: its RAS affine.
        box: box holding every voxel of the mask.
    """
    to_ras = box_affine(affine, box)
    return to_ras[:3, :3] @ np.asarray(ndimage.center_of_mass(mask[box])) + to_ras[:3, 3]


def register_lung(
    fixed_hu: np.ndarray,
    affine_fixed: np.ndarray,
    fixed_lung: np.ndarray,
    moving_hu: np.ndarray,
    affine_moving: np.ndarray,
    moving_lung: np.ndarray,
    metric_margin_mm: float = 3.0,
    registration_spacing_mm: float = 3.0,
    transform_type: str = "Affine",
    seed: int = 1,
) -> np.ndarray:
    """ANTs registration of one lung (steps 1-3 of the module docstring): the RAS initial -> follow-up transform.

    Args:
        fixed_hu: initial scan, HU (x, y, z).
        affine_fixed: its RAS affine.
        fixed_lung: the lung's mask in the initial scan.
        moving_hu: follow-up scan, HU.
        affine_moving: its RAS affine.
        moving_lung: the same lung's mask in the follow-up (its box and centroid only; it does not restrict the metric).
        metric_margin_mm: dilation of the initial lung mask restricting the metric.
        registration_spacing_mm: isotropic voxel size the two boxes are resampled to, or finer for a small
            lung (``VOXELS_ACROSS_LUNG``).
        transform_type: ``"Affine"`` (12 parameters), ``"Similarity"`` or ``"Rigid"``.
        seed: positive seed of ANTs' random metric sampling.
    """
    if transform_type not in TRANSFORM_TYPES:
        raise ValueError(f"unknown transform_type {transform_type!r}: use one of {list(TRANSFORM_TYPES)}")
    spacing_f, spacing_m = voxel_spacing(affine_fixed), voxel_spacing(affine_moving)
    lung_f, lung_m = bounding_box(fixed_lung), bounding_box(moving_lung)
    extent = np.array([s.stop - s.start for s in lung_f]) * spacing_f
    registration_spacing_mm = min(float(registration_spacing_mm), float(extent.min()) / VOXELS_ACROSS_LUNG)
    # The fixed box holds the metric mask and, beyond it, two sigmas of the coarsest level's blur (2 voxels).
    box_f = expand_box(lung_f, metric_margin_mm + 4.0 * registration_spacing_mm, spacing_f, fixed_lung.shape)
    box_m = expand_box(lung_m, SEARCH_MARGIN_MM, spacing_m, moving_lung.shape)
    fixed = registration_image(fixed_hu, affine_fixed, box_f, registration_spacing_mm)
    moving = registration_image(moving_hu, affine_moving, box_m, registration_spacing_mm)
    mask = registration_mask(dilate_mm(fixed_lung[box_f], metric_margin_mm, spacing_f), box_affine(affine_fixed, box_f),
                             fixed)
    start = np.eye(4)
    start[:3, 3] = centroid_ras(moving_lung, affine_moving, lung_m) - centroid_ras(fixed_lung, affine_fixed, lung_f)
    with tempfile.TemporaryDirectory(prefix="cirresdiff_ants_") as tmp, ants_seed(seed):
        write_affine_ras(f"{tmp}/start.mat", start)
        result = ants.registration(
            fixed=fixed, moving=moving, type_of_transform=transform_type, initial_transform=[f"{tmp}/start.mat"],
            mask=mask, aff_metric="mattes", aff_sampling=32, aff_random_sampling_rate=METRIC_SAMPLING,
            aff_iterations=LEVELS["iterations"], aff_shrink_factors=LEVELS["shrink_factors"],
            aff_smoothing_sigmas=LEVELS["smoothing_sigmas"], outprefix=f"{tmp}/lung_", verbose=False,
        )
        # antsRegistration collapses the starting transform into its output (-z 1): one affine.
        (path,) = result["fwdtransforms"]
        transform = read_affine_ras(path)
        # Both read back from single-precision files; a real optimisation moves them far more than 1e-5.
        unmoved = np.allclose(transform, read_affine_ras(f"{tmp}/start.mat"), rtol=0.0, atol=1e-5)
    if unmoved:
        raise RegistrationError("ANTs stopped at its starting transform (an error inside ANTs, e.g. no metric "
                                "samples in the lung mask): the lung could not be registered")
    return transform


def voxel_mapping(affine_fixed: np.ndarray, transform_ras: np.ndarray, affine_moving: np.ndarray) -> np.ndarray:
    """4x4 map from an initial-grid voxel index to the follow-up voxel index showing the same tissue.

    Args:
        affine_fixed: RAS affine of the initial scan.
        transform_ras: RAS initial point -> follow-up point.
        affine_moving: RAS affine of the follow-up.
    """
    return np.linalg.inv(affine_moving) @ transform_ras @ affine_fixed


def warp(moving: np.ndarray, mapping: np.ndarray, box: tuple[slice, ...], order: int, fill: float) -> np.ndarray:
    """Resample the follow-up onto a box of the initial grid.

    Args:
        moving: follow-up voxels.
        mapping: initial voxel index -> follow-up voxel index (``voxel_mapping``).
        box: index box of the initial grid.
        order: 1 linear (HU), 0 nearest (labels).
        fill: value outside the follow-up.
    """
    if np.allclose(mapping, np.eye(4), rtol=0.0, atol=1e-9) and all(s.stop <= n for s, n in zip(box, moving.shape)):
        return moving[box].copy()  # the same grid: sampling voxel centres gives the voxels themselves
    start = np.array([s.start for s in box], dtype=float)
    shape = tuple(s.stop - s.start for s in box)
    return ndimage.affine_transform(moving, mapping[:3, :3], offset=mapping[:3, :3] @ start + mapping[:3, 3],
                                    output_shape=shape, order=order, mode="constant", cval=fill)


def mapped_box(moving_box: tuple[slice, ...], mapping: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Box of the initial grid that a box of the follow-up grid falls into under ``mapping`` (its corners mapped back).

    Args:
        moving_box: index box on the follow-up grid.
        mapping: initial voxel index -> follow-up voxel index.
        shape: initial grid size.
    """
    # Nearest-neighbour sampling reaches half a voxel beyond the box: widen it by one voxel to be safe.
    corners = np.array(np.meshgrid(*[(s.start - 1, s.stop) for s in moving_box], indexing="ij")).reshape(3, -1).T
    inverse = np.linalg.inv(mapping)
    back = corners @ inverse[:3, :3].T + inverse[:3, 3]
    lo, hi = np.floor(back.min(0)).astype(int), np.ceil(back.max(0)).astype(int) + 1
    return tuple(slice(int(max(a, 0)), int(min(b, n))) for a, b, n in zip(lo, hi, shape))


def union_box(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    """Smallest box holding two boxes (an empty one is ignored)."""
    if any(s.stop <= s.start for s in b):
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def warped_dice(fixed_lung: np.ndarray, moving_lung: np.ndarray, mapping: np.ndarray) -> float:
    """Dice of the initial lung and the follow-up lung resampled onto the initial grid (nearest neighbour).

    Resampled only in the box holding both, which is where every voxel of either lies.

    Args:
        fixed_lung: the lung's mask, initial grid.
        moving_lung: the lung's mask, follow-up grid.
        mapping: initial voxel index -> follow-up voxel index.
    """
    box = union_box(bounding_box(fixed_lung), mapped_box(bounding_box(moving_lung), mapping, fixed_lung.shape))
    moved = warp(moving_lung.astype(np.uint8), mapping, box, order=0, fill=0) > 0
    return dice(fixed_lung[box], moved)


def merge_lungs(fixed_labels: np.ndarray, regions: dict[int, np.ndarray], warped: dict[int, np.ndarray],
                spacing: np.ndarray, reach_mm: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-lung aligned follow-ups: each voxel takes the lung whose region (then mask) it belongs to.

    Distances to the lungs decide only where regions overlap, so they are computed in the box of
    the overlap widened by ``reach_mm`` (a voxel of a region is that close to its lung), or, without
    it, in the box of the regions' union, which holds every lung: exact either way.

    Args:
        fixed_labels: lung labels of the initial scan.
        regions: dilated region per lung label (initial scan), each containing its lung.
        warped: aligned follow-up per lung label.
        spacing: voxel size in mm.
        reach_mm: how far a region extends beyond its lung at most (the dilation margin), if known.

    Returns:
        The merged follow-up (HU, air outside every region) and the label of the lung chosen per voxel.
    """
    labels = sorted(regions)
    choice = np.zeros(fixed_labels.shape, dtype=np.uint8)
    for lab in labels:
        choice[regions[lab]] = lab
    overlap = sum(regions[lab].astype(np.uint8) for lab in labels) > 1
    if overlap.any():
        box = bounding_box(np.logical_or.reduce([regions[lab] for lab in labels]) if reach_mm is None else overlap)
        if reach_mm is not None:
            box = expand_box(box, reach_mm, spacing, fixed_labels.shape)
        distance = np.stack([ndimage.distance_transform_edt(fixed_labels[box] != lab, sampling=spacing)
                             for lab in labels])
        distance[~np.stack([regions[lab][box] for lab in labels])] = np.inf
        nearest = np.asarray(labels, dtype=np.uint8)[np.argmin(distance, axis=0)]
        choice[box] = np.where(overlap[box], nearest, choice[box])
    merged = np.full(fixed_labels.shape, AIR_HU, dtype=np.float32)
    for lab in labels:
        merged[choice == lab] = warped[lab][choice == lab]
    return merged, choice


def register_pair(
    initial: np.ndarray,
    affine_initial: np.ndarray,
    initial_labels: np.ndarray,
    followup: np.ndarray,
    affine_followup: np.ndarray,
    followup_labels: np.ndarray,
    margin_mm: float,
    metric_margin_mm: float = 3.0,
    registration_spacing_mm: float = 3.0,
    transform_type: str = "Affine",
    seed: int = 1,
) -> dict:
    """Register each follow-up lung to the initial lung and merge; returns images, transforms and QC.

    Args:
        initial: initial scan, HU (x, y, z).
        affine_initial: its RAS affine.
        initial_labels: its lung labels (1 left, 2 right).
        followup: follow-up scan, HU.
        affine_followup: its RAS affine.
        followup_labels: its lung labels.
        margin_mm: dilation of the initial lungs defining each lung's region in the merged result.
        metric_margin_mm: dilation of the initial lung mask restricting the registration metric; small,
            because the chest wall around a lung moves with the body, not with the lung.
        registration_spacing_mm: isotropic voxel size the registration works at, finer for a lung less than
            30 voxels across (the result is applied at full resolution).
        transform_type: ANTs linear transform, ``"Affine"``, ``"Similarity"`` or ``"Rigid"``.
        seed: positive seed of ANTs' random sampling.

    Returns:
        ``aligned`` (merged follow-up on the initial grid), ``region`` (union of dilated initial
        lungs), ``transforms`` (per lung, RAS initial -> follow-up), ``qc`` (per lung: mask Dice and
        NCC of HU inside the initial lung before and after registration, the transform's rotation
        in degrees and volume factor) and ``unregistered`` (the follow-up on the initial grid
        without registration, for the QC figure).
    """
    spacing_i = voxel_spacing(affine_initial)
    followup = np.asarray(followup, dtype=np.float32)
    identity = voxel_mapping(affine_initial, np.eye(4), affine_followup)
    before = warp(followup, identity, tuple(slice(0, n) for n in initial.shape), order=1, fill=AIR_HU)
    regions, warped, transforms, qc = {}, {}, {}, {}
    for name, lab in LUNG_LABELS.items():
        fixed_lung = initial_labels == lab
        moving_lung = followup_labels == lab
        if not fixed_lung.any() or not moving_lung.any():
            scan = "the initial" if not fixed_lung.any() else "the follow-up"
            raise ValueError(f"the {name} lung is missing in {scan} scan")
        transform = register_lung(initial, affine_initial, fixed_lung, followup, affine_followup, moving_lung,
                                  metric_margin_mm, registration_spacing_mm, transform_type, seed)
        mapping = voxel_mapping(affine_initial, transform, affine_followup)
        box = expand_box(bounding_box(fixed_lung), margin_mm, spacing_i, initial.shape)
        regions[lab] = dilate_mm(fixed_lung, margin_mm, spacing_i)
        warped[lab] = np.full(initial.shape, AIR_HU, dtype=np.float32)
        warped[lab][box] = warp(followup, mapping, box, order=1, fill=AIR_HU)
        transforms[f"{name}_lung"] = transform.tolist()
        qc[f"{name}_lung"] = {
            "dice_before": warped_dice(fixed_lung, moving_lung, identity),
            "dice_after": warped_dice(fixed_lung, moving_lung, mapping),
            "ncc_before": ncc(initial[fixed_lung], before[fixed_lung]),
            "ncc_after": ncc(initial[fixed_lung], warped[lab][fixed_lung]),
            "rotation_deg": rotation_degrees(transform),
            "volume_factor": float(np.linalg.det(transform[:3, :3])),
        }
    aligned, choice = merge_lungs(initial_labels, regions, warped, spacing_i, reach_mm=margin_mm)
    return {"aligned": aligned, "region": choice > 0, "transforms": transforms, "qc": qc, "unregistered": before}
