"""Fibrosis as a label map: the high-attenuation area of the lungs at baseline and at the predicted follow-up.

The high-attenuation area (HAA) is a quantitative CT measure of interstitial lung abnormality:
the share of lung voxels between -600 and -250 HU, outside vessels (Lederer et al., Am J Respir
Crit Care Med 2009; Podolanczuk et al., Eur Respir J 2016, where HAA predicts ILA, decline of FVC
and mortality). Ground glass and reticulation fall in that range; normal parenchyma (about
-850 HU) below it; vessels and other soft tissue above it.

Computed the same way on both scans so that their difference is the disease and not the method:

- both are smoothed by the same Gaussian (``smoothing_mm``) first, because the mean prediction is
  smooth and the acquired scan is not: thresholding raw noise would count a noisy baseline's
  speckle as disease that the prediction then "resolves";
- vessels and the chest wall: voxels above -250 HU that survive a morphological opening (thin
  reticular lines do not, vessels do) and the lung voxels within ``edge_mm`` of them (their
  partial-volume edge, in the HAA range after any smoothing) are excluded.

The label map (``FIBROSIS_LABELS``): 1 where the predicted follow-up has HAA that the baseline
already had, 2 where the predicted follow-up has HAA the baseline did not (predicted new
fibrosis); 0 elsewhere, including baseline HAA that the prediction no longer shows.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from custom.geometry import voxel_spacing
from custom.segmentation import bounding_box, dilate_mm, expand_box

HAA_RANGE_HU = (-600.0, -250.0)
"""Attenuation range of the high-attenuation area (Lederer et al. 2009)."""

FIBROSIS_LABELS = {"background": 0, "fibrosis": 1, "new fibrosis": 2}
"""Labels of the fibrosis map written at inference (also ``metadata.json``'s ``channel_def``)."""


def high_attenuation_area(
    hu: np.ndarray, lungs: np.ndarray, spacing: Sequence[float], smoothing_mm: float = 1.0,
    vessel_min_mm: float = 3.0, edge_mm: float = 1.5,
) -> np.ndarray:
    """The HAA mask of a scan: lung voxels in ``HAA_RANGE_HU`` after smoothing, away from vessels and the lung wall.

    Args:
        hu: the scan in HU (x, y, z).
        lungs: lung mask or labels on the same grid (non-zero inside the lungs).
        spacing: voxel size in mm per axis.
        smoothing_mm: standard deviation of the Gaussian applied before thresholding, in mm.
        vessel_min_mm: dense (> -250 HU) structures at least this thick are vessels or the chest
            wall; thinner ones (reticular lines) are disease and do not exclude their surroundings.
        edge_mm: lung voxels this close to a vessel or the wall are their partial-volume edge, not HAA.
    """
    lung = np.asarray(lungs) > 0
    out = np.zeros(lung.shape, dtype=bool)
    if not lung.any():
        return out
    spacing = np.asarray(spacing, dtype=float)
    # Smoothing and morphology run in the lungs' box (widened by the edge), not the whole scan.
    box = expand_box(bounding_box(lung), edge_mm + 2 * smoothing_mm, spacing, lung.shape)
    smoothed = ndimage.gaussian_filter(np.asarray(hu[box], dtype=np.float32), smoothing_mm / spacing)
    dense = smoothed > HAA_RANGE_HU[1]
    erosions = max(1, int(round(vessel_min_mm / (2 * spacing.min()))))
    cross = ndimage.generate_binary_structure(3, 1)
    # An opening whose erosion treats the box's outside as dense: the chest wall, cut by the box, stays thick.
    core = ndimage.binary_erosion(dense, cross, iterations=erosions, border_value=1)
    thick = ndimage.binary_dilation(core, cross, iterations=erosions) & dense
    near_dense = dilate_mm(thick, edge_mm, spacing)
    out[box] = lung[box] & (smoothed >= HAA_RANGE_HU[0]) & ~dense & ~near_dense
    return out


def fibrosis_map(initial_haa: np.ndarray, followup_haa: np.ndarray) -> np.ndarray:
    """The label map of ``FIBROSIS_LABELS`` from the HAA masks of the baseline and the follow-up.

    Args:
        initial_haa: HAA mask of the baseline scan.
        followup_haa: HAA mask of the (predicted) follow-up on the same grid.
    """
    labels = np.zeros(initial_haa.shape, dtype=np.uint8)
    labels[followup_haa & initial_haa] = FIBROSIS_LABELS["fibrosis"]
    labels[followup_haa & ~initial_haa] = FIBROSIS_LABELS["new fibrosis"]
    return labels


def haa_summary(initial_haa: np.ndarray, followup_haa: np.ndarray, lungs: np.ndarray,
                spacing: Sequence[float]) -> dict[str, float]:
    """HAA as a share of the lungs at baseline and follow-up, and the predicted new fibrosis in ml.

    Args:
        initial_haa: HAA mask of the baseline scan.
        followup_haa: HAA mask of the follow-up.
        lungs: lung mask of the baseline scan.
        spacing: voxel size in mm per axis.
    """
    lung_voxels = max(int(np.count_nonzero(lungs)), 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        "haa_percent_initial": 100.0 * np.count_nonzero(initial_haa) / lung_voxels,
        "haa_percent_followup": 100.0 * np.count_nonzero(followup_haa) / lung_voxels,
        "new_fibrosis_ml": np.count_nonzero(followup_haa & ~initial_haa) * voxel_ml,
        "lung_volume_ml": lung_voxels * voxel_ml,
    }


class FibrosisMapd(MapTransform):
    """Add ``fibrosis`` (the label map, initial scan's space) and ``fibrosis_summary`` (HAA numbers) to a case.

    Args:
        keys: key of the follow-up in HU on the initial scan's grid (``FollowupOutputsd``'s ``pred``).
        source_key: key of the initial scan in HU.
        lungs_key: key of the initial scan's lung labels on its own grid.
        smoothing_mm: see ``high_attenuation_area``.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable = "pred", source_key: str = "image_hu",
                 lungs_key: str = "image_lungs", smoothing_mm: float = 1.0) -> None:
        super().__init__(keys)
        self.source_key, self.lungs_key, self.smoothing_mm = source_key, lungs_key, float(smoothing_mm)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        followup = d[self.first_key(d)]
        source = d[self.source_key]
        spacing = voxel_spacing(np.asarray(source.affine))
        lungs = np.asarray(d[self.lungs_key][0])
        initial_haa = high_attenuation_area(np.asarray(source[0]), lungs, spacing, self.smoothing_mm)
        followup_haa = high_attenuation_area(np.asarray(followup[0]), lungs, spacing, self.smoothing_mm)
        d["fibrosis"] = MetaTensor(fibrosis_map(initial_haa, followup_haa)[None], affine=source.affine,
                                   meta={"filename_or_obj": source.meta.get("filename_or_obj", "")})
        d["fibrosis_summary"] = haa_summary(initial_haa, followup_haa, lungs, spacing)
        return d
