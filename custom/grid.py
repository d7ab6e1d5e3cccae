"""The model grid: the axis-aligned box of isotropic voxels, centred on the lung region, that the model sees.

Preparation resamples both scans onto it, training and evaluation read the prepared grids, and
inference resamples a raw scan onto the same grid before mapping the prediction back. Each config
names a preset (``"grid": "adult"``) or gives ``{"size": [x, y, z], "spacing_mm": s}``; the
numbers live here only.

- ``adult`` (the shipped model): 2 mm voxels over 352 x 256 x 320 mm, which holds the dilated lung
  region of adult chests up to about 6.5 litres of lung (the synthetic cohort's largest; real adult
  lungs are 260-300 mm wide, 170-220 mm deep, 220-300 mm high). 2 mm keeps a whole-chest mean
  prediction at seconds on a CPU.
- ``demo``: the same box at 4 mm, so ``make demo`` trains and evaluates on 2 CPU cores in minutes.
- ``paper``: the paper's 1 mm, 512 x 512 x 256 (a GPU setting).
- ``small``: 1.5 mm over a 108 mm cube, for the tests' small chests (``synthetic.SMALL_BODY_SCALE``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """An isotropic voxel grid of fixed size.

    Args:
        size: voxels per axis (x, y, z).
        spacing_mm: voxel size in mm.
    """

    size: tuple[int, int, int]
    spacing_mm: float

    def __post_init__(self) -> None:
        size = tuple(int(n) for n in self.size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"a grid needs three positive sizes, got {self.size!r}")
        if not np.isfinite(self.spacing_mm) or self.spacing_mm <= 0:
            raise ValueError(f"a grid needs a positive spacing in mm, got {self.spacing_mm!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "spacing_mm", float(self.spacing_mm))

    @property
    def extent_mm(self) -> np.ndarray:
        """Edge lengths of the box in mm."""
        return np.asarray(self.size) * self.spacing_mm

    def affine(self, centre_ras: Sequence[float]) -> np.ndarray:
        """Voxel-to-RAS affine of the grid centred on ``centre_ras``.

        Args:
            centre_ras: centre of the box in mm.
        """
        affine = np.diag([self.spacing_mm] * 3 + [1.0])
        affine[:3, 3] = np.asarray(centre_ras, dtype=float) - (np.asarray(self.size) - 1) / 2.0 * self.spacing_mm
        return affine

    def describe(self) -> str:
        """``"176x128x160 at 2 mm"``: how messages and summaries name the grid."""
        return "x".join(str(n) for n in self.size) + f" at {self.spacing_mm:g} mm"

    def as_dict(self) -> dict:
        """JSON form, as configs write it."""
        return {"size": list(self.size), "spacing_mm": self.spacing_mm}


GRIDS = {
    "adult": Grid((176, 128, 160), 2.0),
    "demo": Grid((88, 64, 80), 4.0),
    "paper": Grid((512, 512, 256), 1.0),
    "small": Grid((72, 72, 72), 1.5),
}
"""The named grids configs can use."""


def as_grid(grid: Grid | str | Mapping) -> Grid:
    """The grid a config value names: a preset name, ``{"size": ..., "spacing_mm": ...}``, or a ``Grid``.

    Args:
        grid: the config value.
    """
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}: use one of {sorted(GRIDS)} "
                             "or {'size': [x, y, z], 'spacing_mm': s}")
        return GRIDS[grid]
    if isinstance(grid, Mapping) and set(grid) == {"size", "spacing_mm"}:
        return Grid(tuple(grid["size"]), grid["spacing_mm"])
    raise TypeError(f"grid={grid!r} ({type(grid).__name__}) is not a grid: use one of {sorted(GRIDS)} "
                    "or {'size': [x, y, z], 'spacing_mm': s}")
