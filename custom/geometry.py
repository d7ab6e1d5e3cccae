"""Grids, affines and resampling between a scan and the model grid, and the HU <-> [0, 1] intensity mapping.

Arrays are (x, y, z) with a voxel-to-RAS affine in mm, as MONAI loads NIfTI; a scan and the model
grid (``custom.grid``) are related by position alone, so moving data between them is a resampling
by physical position. Preparation and inference map scans onto the model grid and intensities to
[0, 1]; inference maps the prediction back with the same helpers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

from custom.constants import HU_WINDOW


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis.

    Args:
        affine: voxel-to-RAS affine.
    """
    return np.linalg.norm(affine[:3, :3], axis=0)


def resample(array: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray, shape: Sequence[int],
             order: int, fill: float, antialias: bool = False) -> np.ndarray:
    """Resample ``array`` onto another grid by physical position.

    Args:
        array: source voxels (x, y, z).
        source_affine: its RAS affine.
        target_affine: RAS affine of the target grid.
        shape: target grid size.
        order: interpolation order (0 nearest, 1 linear).
        fill: value outside the source.
        antialias: low-pass the source first where the target is coarser (Gaussian, sigma = (ratio - 1) / 2
            source voxels, as MONAI's ``Resize``), so a 2 mm grid shows the same image whatever the scan's
            spacing; only the part of the source the target covers is filtered.
    """
    mapping = np.linalg.inv(source_affine) @ target_affine
    shape = tuple(int(s) for s in shape)
    source = np.asarray(array, dtype=np.float32)
    if antialias:
        ratio = np.linalg.norm(mapping[:3, :3], axis=1)  # target voxels per source voxel, per source axis
        sigma = np.maximum((ratio - 1.0) / 2.0, 0.0)
        if sigma.max() > 0.1:
            corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape], indexing="ij")).reshape(3, -1).T
            reach = corners @ mapping[:3, :3].T + mapping[:3, 3]
            pad = np.ceil(4 * sigma).astype(int) + 2
            lo = np.clip(np.floor(reach.min(0)).astype(int) - pad, 0, source.shape)
            hi = np.clip(np.ceil(reach.max(0)).astype(int) + pad + 1, 0, source.shape)
            if np.all(hi > lo):
                source = ndimage.gaussian_filter(source[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], sigma, mode="nearest")
                mapping = mapping.copy()
                mapping[:3, 3] -= lo
    return ndimage.affine_transform(source, mapping[:3, :3], offset=mapping[:3, 3], output_shape=shape, order=order,
                                    mode="constant", cval=fill)


MAX_SMOOTHING_SIGMA = 3.0
"""Voxels; the largest smoothing of a mean prediction the bundle accepts (more would blur the lesions away)."""


def gaussian_smooth(volume: torch.Tensor | np.ndarray, sigma: float) -> torch.Tensor:
    """Gaussian filter over the last three (spatial) axes, in voxels; returns a tensor on the input's device.

    Args:
        volume: array or tensor (..., D, H, W).
        sigma: standard deviation in voxels (0: the values as they are).
    """
    tensor = torch.as_tensor(volume)
    values = tensor.detach().float().cpu().numpy()
    smooth = ndimage.gaussian_filter(values, sigma=(0,) * (values.ndim - 3) + (sigma,) * 3) if sigma > 0 else values
    return torch.as_tensor(smooth, dtype=tensor.dtype if tensor.is_floating_point() else torch.float32,
                           device=tensor.device)


def as_meta(array: np.ndarray, affine: np.ndarray, meta: Mapping | None = None) -> MetaTensor:
    """A channel-first MetaTensor (1, x, y, z) with an affine and optional extra metadata.

    As in MONAI (``LoadImage`` sets them, ``Spacing`` and the like keep them), ``original_affine`` and
    ``spatial_shape`` describe the image *as loaded*: taken from ``meta`` when it has them (an image
    derived from a loaded scan: moved onto the model grid, normalised, aligned), else this array's
    own. MONAI Label's ``Restored`` maps its result back onto ``spatial_shape`` and ``original_affine``
    of the input image; on the model grid's shape it would stretch a result made in the scan's space.

    Args:
        array: voxel data (x, y, z).
        affine: voxel-to-RAS affine.
        meta: metadata to copy (its ``affine`` is replaced by ``affine``).
    """
    affine = np.asarray(affine, dtype=np.float64)
    out = MetaTensor(np.asarray(array)[None], affine=affine)
    if meta is not None:
        out.meta.update({k: v for k, v in meta.items() if k != "affine"})
    out.meta.setdefault("original_affine", affine)
    out.meta.setdefault("spatial_shape", np.asarray(np.shape(array)))
    return out


def normalize_hu(hu: np.ndarray, mode: str = "window", window: Sequence[float] = HU_WINDOW,
                 region: np.ndarray | None = None) -> np.ndarray:
    """Map HU to [0, 1]: a fixed window, or min-max of the scan (inside ``region`` when given).

    Args:
        hu: Hounsfield units (scanner padding already clipped by ``custom.io.check_ct``).
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
