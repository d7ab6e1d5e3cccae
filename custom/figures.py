"""Pictures for a person: the paper's Fig. 3-style comparison of initial, generated and real scans."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import uniform_filter  # noqa: E402

from custom.io import write_png  # noqa: E402


def _slices(volume: np.ndarray, index: Sequence[int]) -> list[np.ndarray]:
    """Coronal and axial slices of an (x, y, z) RAS volume, oriented as radiologists read them."""
    x, y, z = index
    coronal = np.rot90(volume[:, y, :])
    axial = np.rot90(volume[:, :, z])
    return [coronal, axial]


def _lesion_centre(initial: np.ndarray, followup: np.ndarray, mask: np.ndarray | None) -> tuple[int, int, int]:
    """Slice indices through the strongest change, so the figure shows where the disease moved."""
    change = np.abs(followup - initial)
    if mask is not None and mask.any():
        change = change * (mask > 0)
    if not change.any():
        return tuple(s // 2 for s in initial.shape)  # type: ignore[return-value]
    # Smoothed so that one noisy voxel cannot choose the slices.
    smooth = uniform_filter(change.astype(np.float32), size=5)
    return tuple(int(i) for i in np.unravel_index(np.argmax(smooth), smooth.shape))  # type: ignore[return-value]


def save_comparison_figure(
    path: str | os.PathLike,
    initial: np.ndarray,
    generated: np.ndarray,
    real_followup: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    title: str = "",
    change_range: float = 0.3,
) -> Path:
    """Write a PNG like CIResDiff's Fig. 3: initial, generated and real follow-up, and their changes.

    Columns: initial scan, generated follow-up, real follow-up (when known), generated minus
    initial, real minus initial (when known), voxel-wise standard deviation (when several samples
    were drawn). Rows: a coronal and an axial slice through the largest predicted change. The
    file is written atomically.

    Args:
        path: destination PNG.
        initial: initial scan (x, y, z) in [0, 1].
        generated: generated follow-up on the same grid.
        real_followup: real follow-up on the same grid, if known.
        uncertainty: standard deviation over samples, if several were drawn.
        mask: lung region used to choose the slices.
        title: figure title (e.g. the patient and the lung-function text).
        change_range: intensity difference shown at full colour in the change maps.
    """
    index = _lesion_centre(initial, generated, mask)
    panels: list[tuple[str, np.ndarray, dict]] = [
        ("initial", initial, {"cmap": "gray", "vmin": 0, "vmax": 1}),
        ("generated follow-up", generated, {"cmap": "gray", "vmin": 0, "vmax": 1}),
    ]
    diff_style = {"cmap": "seismic", "vmin": -change_range, "vmax": change_range}
    if real_followup is not None:
        panels.append(("real follow-up", real_followup, {"cmap": "gray", "vmin": 0, "vmax": 1}))
    panels.append(("generated - initial", generated - initial, diff_style))
    if real_followup is not None:
        panels.append(("real - initial", real_followup - initial, diff_style))
    if uncertainty is not None:
        style = {"cmap": "magma", "vmin": 0, "vmax": max(float(uncertainty.max()), 1e-6)}
        panels.append(("uncertainty (std)", uncertainty, style))

    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.4), squeeze=False, layout="constrained")
    for col, (name, volume, style) in enumerate(panels):
        for row, image in enumerate(_slices(np.asarray(volume, dtype=np.float32), index)):
            ax = axes[row, col]
            shown = ax.imshow(image, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
        if style["cmap"] != "gray":
            fig.colorbar(shown, ax=axes[:, col], shrink=0.6, fraction=0.05)
    axes[0, 0].set_ylabel("coronal")
    axes[1, 0].set_ylabel("axial")
    if title:
        fig.suptitle(title, fontsize=8, wrap=True)
    try:
        return write_png(path, fig, dpi=110)
    finally:
        plt.close(fig)
