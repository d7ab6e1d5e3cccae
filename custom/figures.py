"""Pictures for a person: the paper's Fig. 3-style comparison of initial, generated and real scans, and the
registration QC picture of a prepared pair."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

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
    smooth = ndimage.uniform_filter(change.astype(np.float32), size=5)
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


def qc_figure(
    path: str | os.PathLike, initial: np.ndarray, before: np.ndarray, after: np.ndarray, mask: np.ndarray, title: str
) -> None:
    """Registration QC picture: initial, follow-up before and after, checkerboard; three orthogonal planes.

    Args:
        path: destination PNG (written atomically).
        initial: prepared initial scan in [0, 1].
        before: follow-up on the same grid without registration.
        after: follow-up after per-lung registration.
        mask: region mask (its outline is drawn, and its centre chooses the slices).
        title: figure title.
    """
    centre = [int(round(c)) for c in ndimage.center_of_mass(mask > 0)]
    # The sagittal midline cuts the mediastinum; cut through the centre of the right lung (lower x) instead.
    centre[0] = int(round(ndimage.center_of_mass(mask[: centre[0]] > 0)[0]))
    tile = max(4, min(initial.shape) // 8)
    # Broadcast 1-D tile indices: np.indices of a 512 x 512 x 256 grid alone is 1.6 GB and ~10 s.
    checker = (sum(np.arange(n).reshape([-1 if a == axis else 1 for a in range(3)]) // tile
                   for axis, n in enumerate(initial.shape)) % 2).astype(bool)
    columns = [("initial", initial), ("follow-up, unregistered", before), ("follow-up, registered", after),
               ("checkerboard initial / registered", np.where(checker, initial, after))]
    planes = [(lambda v: np.rot90(v[:, :, centre[2]]), "axial"), (lambda v: np.rot90(v[:, centre[1], :]), "coronal"),
              (lambda v: np.rot90(v[centre[0], :, :]), "sagittal")]
    fig, axes = plt.subplots(3, 4, figsize=(12, 9), layout="constrained")
    try:
        for row, (cut, plane) in enumerate(planes):
            for col, (name, volume) in enumerate(columns):
                ax = axes[row, col]
                ax.imshow(cut(volume), cmap="gray", vmin=0.0, vmax=1.0)
                ax.contour(cut(mask > 0).astype(float), levels=[0.5], colors="yellow", linewidths=0.5)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(name, fontsize=9)
                if col == 0:
                    ax.set_ylabel(plane)
        fig.suptitle(title, fontsize=10)
        write_png(path, fig)
    finally:
        plt.close(fig)


LUNG_WINDOW_HU = (-1350.0, 150.0)
"""Display window of the fibrosis picture: a lung window (level -600, width 1500), as radiologists view the lungs."""


def save_fibrosis_figure(
    path: str | os.PathLike, initial_hu: np.ndarray, followup_hu: np.ndarray, labels: np.ndarray,
    spacing: Sequence[float], title: str = "",
) -> Path:
    """What a labelling tool shows: baseline, predicted follow-up, and the follow-up with the fibrosis labels.

    Rows: a coronal and an axial slice through the most predicted new fibrosis (label 2; else
    any label); columns: baseline CT, predicted follow-up CT (lung window), predicted follow-up
    with fibrosis present at both scans (label 1, yellow) and predicted new fibrosis (label 2,
    red) overlaid as a viewer (3D Slicer, OHIF) draws a label map. Slices keep the voxel aspect.

    Args:
        path: destination PNG (written atomically).
        initial_hu: baseline CT (x, y, z), HU.
        followup_hu: predicted follow-up on the same grid, HU.
        labels: fibrosis label map on the same grid (``custom.fibrosis.FIBROSIS_LABELS``).
        spacing: voxel size in mm per axis, for the aspect of the slices.
        title: figure title.
    """
    labels = np.asarray(labels)
    target = labels == 2 if (labels == 2).any() else labels > 0
    index = _lesion_centre(np.zeros(labels.shape, np.float32), target.astype(np.float32), None)
    colours = np.zeros((*labels.shape, 4), dtype=np.float32)
    colours[labels == 1] = (1.0, 0.85, 0.0, 0.55)
    colours[labels == 2] = (1.0, 0.1, 0.1, 0.7)
    sx, sy, sz = (float(s) for s in spacing)
    aspects = [sz / sx, sy / sx]  # coronal shows (z, x), axial (y, x): the voxel aspect of each plane
    style = {"cmap": "gray", "vmin": LUNG_WINDOW_HU[0], "vmax": LUNG_WINDOW_HU[1], "interpolation": "nearest"}
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 7.5), squeeze=False, layout="constrained")
    try:
        for row, aspect in enumerate(aspects):
            base, followup = (_slices(np.asarray(v, dtype=np.float32), index)[row] for v in (initial_hu, followup_hu))
            overlay = np.rot90(colours[:, index[1], :] if row == 0 else colours[:, :, index[2]])
            for col, (name, image) in enumerate([("baseline", base), ("predicted follow-up", followup),
                                                 ("fibrosis (yellow), predicted new (red)", followup)]):
                ax = axes[row, col]
                ax.imshow(image, aspect=aspect, **style)
                if col == 2:
                    ax.imshow(overlay, aspect=aspect, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(name, fontsize=9)
        axes[0, 0].set_ylabel("coronal")
        axes[1, 0].set_ylabel("axial")
        if title:
            fig.suptitle(title, fontsize=9, wrap=True)
        return write_png(path, fig, dpi=110)
    finally:
        plt.close(fig)
