"""The synthetic IPF cohort: paired chest CTs, lesions, per-lung motion and lung-function tests.

Real IPF data (OSIC) cannot be shipped, so the bundle generates a cohort that exercises every
part of the method honestly. Each patient is an analytic chest phantom rendered in Hounsfield
units on the patient's own voxel grid (spacing varies per patient, RAS affine in the header):

- body (skin, subcutaneous fat, muscle), scanner table, spine with discs, ribs, mediastinum and
  heart, trachea and main bronchi with walls;
- two lungs (parenchyma about -850 HU) with a branching vessel tree and partial-volume edges;
- IPF lesions in a subpleural, basal-predominant pattern: ground glass at the front of the
  disease, reticulation behind it, honeycombing (clustered air cysts with dense walls) where it is
  oldest. A lesion *burden* (fraction of lung volume) sets how far the pattern reaches; the same
  random field is thresholded lower in the follow-up, so lesions extend where they were;
- the follow-up scan is moved by a different affine per lung (posture and breathing) and a
  smaller one for the rest of the body; the ground-truth transforms are saved;
- lung-function tests consistent with the images: FVC % predicted falls with the baseline burden,
  and the yearly FVC decline depends on the baseline (lower % predicted and current smoking
  progress faster), so the text carries real information about the future scan. The lesion
  burden of the follow-up grows with the FVC decline. Progression = relative FVC decline >= 10 %
  (ATS/ERS/JRS/ALAT 2022 guideline on progressive pulmonary fibrosis).

Coordinates are millimetres in RAS (x to the patient's left, y anterior, z superior); arrays are
indexed (x, y, z). ``body_scale`` = 1 (the default) is an adult chest at real-CT geometry: a
512 x 512 matrix of 0.6-0.85 mm pixels over the chest, slices of 1-2.5 mm covering both lungs from
apex to base, lungs of about 3-6 litres whose volume follows the patient's FVC (lung volume on CT
tracks FVC in ILD). Smaller values shrink every structure alike (the tests use small chests).

The anatomy is rendered at ``DETAIL_MM`` (2 mm for an adult, scaled with the body) and resampled
linearly onto the scanner grid, where the acquisition noise is added: this keeps an adult pair at
seconds instead of minutes, and 2 mm is the resolution the shipped model sees.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from custom.constants import LEFT_LUNG, LESION_LABELS, RIGHT_LUNG
from custom.io import atomic_folder, atomic_write_bytes, nifti_bytes

SMOKING = ("Never smoked", "Ex-smoker", "Currently smokes")
DEFAULT_BODY_SCALE = 1.0
SMALL_BODY_SCALE = 0.25
"""A small chest whose dilated lungs fit the "small" grid (a 108 mm cube): what the tests use."""
# Adult half-sizes in mm (x: half width, y: half depth, z: half height of the imaged chest).
ADULT_HALF_SIZE = np.array([170.0, 115.0, 150.0])
NOMINAL_LUNG_ML = 4300.0
"""Volume of both lungs of the phantom at ``ADULT_HALF_SIZE`` (measured by rendering it at 1 mm)."""
DETAIL_MM = 2.0
"""Voxel size the adult anatomy is rendered at before resampling to the scanner grid."""
MATRIX = 512
"""In-plane matrix of the scans (the field of view sets the pixel size)."""
SLICE_MM = (1.0, 1.25, 1.5, 2.0, 2.5)
"""Slice spacings a scan is reconstructed at (one drawn per patient), as in the OSIC scans."""


def lung_volume_ml(fvc_ml: float) -> float:
    """Lung volume at full inspiration on CT for a measured FVC: about TLC = FVC + residual volume.

    Args:
        fvc_ml: forced vital capacity in ml.
    """
    return 1.2 * fvc_ml + 900.0


@dataclass
class Patient:
    """Tabular description of one synthetic patient (the lung-function table and image parameters)."""

    patient_id: str
    age: int
    sex: str
    smoking: str
    height_cm: float
    fvc: float
    percent: float
    dlco: float
    weeks: float
    followup_fvc: float
    followup_percent: float
    burden: float
    followup_burden: float
    lung_ml: float = NOMINAL_LUNG_ML

    @property
    def decline(self) -> float:
        """Relative FVC decline between the scans."""
        return (self.fvc - self.followup_fvc) / self.fvc

    @property
    def progression(self) -> int:
        """1 when the relative FVC decline is at least 10 %."""
        return int(self.decline >= 0.10)


def patient_rng(seed: int, index: int) -> np.random.Generator:
    """Independent random stream of patient ``index``, so N and N+5 patients share their first N.

    Args:
        seed: cohort seed.
        index: patient index.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def predicted_fvc_ml(sex: str, age: float, height_cm: float) -> float:
    """Predicted FVC of an adult (ECSC/ERS 1993 reference equations), in ml.

    Args:
        sex: ``Male`` or ``Female``.
        age: years.
        height_cm: standing height.
    """
    h = height_cm / 100.0
    litres = 5.76 * h - 0.026 * age - 4.34 if sex == "Male" else 4.43 * h - 0.026 * age - 2.89
    return 1000.0 * litres


SMOKING_RATE = {"Never smoked": 0.0, "Ex-smoker": 0.02, "Currently smokes": 0.07}
"""Yearly relative FVC decline added by each smoking status."""
STABLE_FRACTION = 0.25
"""Share of patients whose disease is near-stable: drawn at random, nothing at baseline shows it."""
STABLE_FACTOR = 0.15
"""Their yearly decline as a fraction of the baseline rate."""
RATE_NOISE_SD = 0.025
"""Patient-to-patient spread of the yearly decline around the law."""
DECLINE_RANGE = (-0.03, 0.45)
"""Clip of the relative decline at the follow-up."""


def baseline_rate(percent: float, smoking: str) -> float:
    """Yearly relative FVC decline the baseline predicts: faster with lower % predicted and with smoking.

    Args:
        percent: FVC % predicted at the initial scan.
        smoking: smoking status, one of ``SMOKING``.
    """
    return 0.04 + 0.28 * (1.0 - percent / 100.0) + SMOKING_RATE[smoking]


def decline_law(percent: float, smoking: str, weeks: float, quantiles: int = 2000) -> np.ndarray:
    """The cohort's distribution of the relative FVC decline given everything observable at baseline.

    What ``sample_patient`` draws, as ``quantiles`` equally likely values (a deterministic
    quadrature of the two-component mixture: near-stable or not, each with normal spread). The
    initial scan adds nothing to it: the lesion burden acts on the decline only through ``percent``.

    Args:
        percent: FVC % predicted at the initial scan.
        smoking: smoking status, one of ``SMOKING``.
        weeks: interval to the follow-up.
        quantiles: quadrature points in all (the near-stable share of them for that component).
    """
    from scipy.stats import norm

    base = baseline_rate(percent, smoking)
    stable = int(round(quantiles * STABLE_FRACTION))
    rates = [scale * base + RATE_NOISE_SD * norm.ppf((np.arange(n) + 0.5) / n)
             for scale, n in ((STABLE_FACTOR, stable), (1.0, quantiles - stable))]
    return np.clip(np.concatenate(rates) * weeks / 52.0, *DECLINE_RANGE)


def sample_patient(patient_id: str, rng: np.random.Generator) -> Patient:
    """Draw one patient's lung-function tests and lesion burdens, consistently with each other.

    Args:
        patient_id: identifier written in the table.
        rng: the patient's random stream.
    """
    sex = "Male" if rng.random() < 0.72 else "Female"
    age = int(rng.integers(55, 86))
    smoking = SMOKING[int(rng.choice(3, p=[0.32, 0.58, 0.10]))]
    height = float(rng.normal(176, 7) if sex == "Male" else rng.normal(163, 6))
    burden = float(rng.uniform(0.03, 0.30))
    percent = float(np.clip(100.0 - 130.0 * burden + rng.normal(0, 5), 35, 115))
    fvc = percent / 100.0 * predicted_fvc_ml(sex, age, height)
    dlco = float(np.clip(85.0 - 120.0 * burden + rng.normal(0, 7), 15, 110))
    weeks = float(np.clip(rng.normal(46, 8), 26, 70))
    rate = baseline_rate(percent, smoking) * (STABLE_FACTOR if rng.random() < STABLE_FRACTION else 1.0)
    rate = rate + rng.normal(0, RATE_NOISE_SD)
    decline = float(np.clip(rate * weeks / 52.0, *DECLINE_RANGE))
    followup_fvc = fvc * (1.0 - decline)
    followup_burden = float(np.clip(burden + 1.1 * max(decline, 0.0), burden, 0.6))
    lung_ml = lung_volume_ml(fvc) * float(np.exp(rng.normal(0.0, 0.06)))
    return Patient(
        patient_id=patient_id, age=age, sex=sex, smoking=smoking, height_cm=round(height, 1), fvc=round(fvc),
        percent=round(percent, 1), dlco=round(dlco, 1), weeks=round(weeks), followup_fvc=round(followup_fvc),
        followup_percent=round(percent * (1.0 - decline), 1), burden=burden, followup_burden=followup_burden,
        lung_ml=lung_ml,
    )


def random_affine(
    rng: np.random.Generator, centre: np.ndarray, max_deg: float, max_mm: float, max_scale: float
) -> np.ndarray:
    """A 4x4 RAS affine rotating and scaling about ``centre`` and translating.

    Args:
        rng: random stream.
        centre: point (mm) the rotation and scaling keep fixed.
        max_deg: largest rotation about each axis in degrees.
        max_mm: largest translation along each axis in mm.
        max_scale: largest relative scale change along each axis.
    """
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    linear = rz @ ry @ rx @ np.diag(1.0 + rng.uniform(-max_scale, max_scale, 3))
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ centre + rng.uniform(-max_mm, max_mm, 3)
    return out


class ChestPhantom:
    """Analytic chest anatomy of one patient, rendered on any voxel grid.

    Args:
        rng: the patient's random stream (anatomy variations, vessel tree, lesion field).
        body_scale: 1 for an adult chest; smaller values shrink every structure alike.
        lung_ml: lung volume of the adult chest (before ``body_scale``); the whole chest is scaled to it.
    """

    def __init__(self, rng: np.random.Generator, body_scale: float, lung_ml: float = NOMINAL_LUNG_ML) -> None:
        self.body_scale = body_scale
        self.s = body_scale * (lung_ml / NOMINAL_LUNG_ML) ** (1.0 / 3.0)
        # Shape varies per patient at constant volume, so the lung volume is the one asked for.
        shape = rng.uniform(0.92, 1.08, 3)
        self.half = ADULT_HALF_SIZE * self.s * shape / np.prod(shape) ** (1.0 / 3.0)
        hx, hy, hz = self.half
        # Lungs: ellipsoids either side of the mediastinum; index 0 = right (x < 0), 1 = left.
        self.lung_centres = np.array([[-0.45 * hx, -0.05 * hy, 0.05 * hz], [0.47 * hx, -0.05 * hy, 0.05 * hz]])
        self.lung_axes = np.array([[0.36 * hx, 0.68 * hy, 0.85 * hz], [0.33 * hx, 0.66 * hy, 0.83 * hz]])
        self.lung_axes *= rng.uniform(0.95, 1.05, (2, 3))
        self.heart_centre = np.array([0.12 * hx, 0.32 * hy, -0.35 * hz])
        self.heart_axes = np.array([0.33 * hx, 0.40 * hy, 0.33 * hz])
        self.vessels = [self._vessel_tree(rng, i) for i in range(2)]
        self.field_seed = int(rng.integers(2**31))
        self.cyst_phase = rng.uniform(0.5, 2.0, (3, 3))
        self._atlas: tuple[np.ndarray, np.ndarray, float] | None = None

    def _vessel_tree(self, rng: np.random.Generator, side: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Segments (start, end, radius mm) branching from the hilum towards the lung periphery."""
        c, a = self.lung_centres[side], self.lung_axes[side]
        hilum = c + np.array([(0.55 if side == 0 else -0.55) * a[0], 0.1 * a[1], 0.25 * a[2]])
        segments = []
        stack = [(hilum, c - hilum, 2.2 * max(self.s, 0.25) ** 0.5 * 1.4, 0)]
        while stack:
            start, direction, radius, depth = stack.pop()
            direction = direction / (np.linalg.norm(direction) + 1e-9)
            length = 0.45 * np.mean(a) * 0.72**depth
            end = start + direction * length
            segments.append((start, end, radius))
            if depth < 4:
                for _ in range(2):
                    new_dir = direction + rng.normal(0, 0.6, 3)
                    stack.append((end, new_dir, radius * 0.72, depth + 1))
        return segments

    def ellipsoid_radius(self, pts: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
        """Normalised ellipsoid radius: < 1 inside."""
        q = (pts - centre.astype(pts.dtype)) / axes.astype(pts.dtype)
        return np.sqrt(np.einsum("...i,...i->...", q, q))

    def render(
        self, pts: np.ndarray, burden: float, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """HU, lung labels and lesion labels at points ``pts`` (..., 3) in the body frame.

        Args:
            pts: RAS points in mm.
            burden: fraction of lung volume affected by lesions.
            rng: random stream for the acquisition noise; ``None`` renders the noise-free anatomy.
        """
        hx, hy, hz = self.half
        x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
        r_body = np.sqrt((x / hx) ** 2 + (y / hy) ** 2)
        inside_z = np.abs(z) <= hz * 1.2
        hu = np.full(pts.shape[:-1], -1000.0, dtype=np.float32)
        body = (r_body < 1.0) & inside_z
        hu[body] = 40.0
        hu[body & (r_body > 0.88)] = -100.0  # subcutaneous fat
        hu[body & (r_body > 0.975)] = 10.0  # skin
        hu[(y < -1.06 * hy) & (y > -1.16 * hy) & (np.abs(x) < 1.3 * hx)] = 150.0  # table
        # Spine: vertebral bodies separated by discs; ribs: thin arcs at regular heights.
        spine = np.sqrt((x / (0.13 * hx)) ** 2 + ((y + 0.72 * hy) / (0.17 * hy)) ** 2) < 1.0
        disc = np.mod(z / (0.16 * hz), 1.0) < 0.2
        hu[spine & inside_z] = np.where(disc[spine & inside_z], 70.0, 450.0)
        rib_band = (r_body > 0.80) & (r_body < 0.86) & (y < 0.55 * hy)
        rib_level = np.abs(np.mod(z / (0.22 * hz) + 0.5 * (x > 0), 1.0) - 0.5) < 0.09
        hu[rib_band & rib_level & inside_z] = 700.0

        lung_lab = np.zeros(pts.shape[:-1], dtype=np.uint8)
        heart = self.ellipsoid_radius(pts, self.heart_centre, self.heart_axes) < 1.0
        depth = np.zeros(pts.shape[:-1], dtype=np.float32)
        for side, label in ((0, RIGHT_LUNG), (1, LEFT_LUNG)):
            rho = self.ellipsoid_radius(pts, self.lung_centres[side], self.lung_axes[side])
            # Diaphragm dome: flattens the lung base.
            dome = z > self.lung_centres[side][2] - self.lung_axes[side][2] * (
                0.75 - 0.35 * ((x - self.lung_centres[side][0]) / self.lung_axes[side][0]) ** 2)
            inside = (rho < 1.0) & dome & ~heart
            lung_lab[inside] = label
            depth[inside] = ((1.0 - rho[inside]) * self.lung_axes[side].min())
        hu[heart] = 45.0
        lungs = lung_lab > 0
        hu[lungs] = -860.0

        # Vessels: partial-volume tubes rendered from the segment tree.
        vessel = self._vessel_density(pts)
        hu[lungs] = hu[lungs] + (45.0 + 860.0) * vessel[lungs]

        # Airways: trachea down to the carina, main bronchi to the hila; wall 1 mm of soft tissue.
        airway_lumen, airway_wall = self._airways(pts)
        hu[airway_wall & body] = 20.0
        hu[airway_lumen & body] = -1000.0
        lung_lab[airway_lumen | airway_wall] = 0

        lesion_lab = self._lesions(pts, lung_lab, depth, burden)
        hu = self._paint_lesions(hu, pts, lesion_lab)
        return (hu if rng is None else add_acquisition_noise(hu, rng)), lung_lab, lesion_lab

    def _vessel_atlas(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Vessel partial-volume fraction on a fine body-frame grid, rasterised once per patient.

        Both scans sample this one atlas, so their vessel trees are the same tissue.
        """
        if self._atlas is None:
            h = 0.6 * (max(self.s, 0.25) / 0.25) ** 0.5
            lo = (self.lung_centres - self.lung_axes).min(0) - 3.0
            hi = (self.lung_centres + self.lung_axes).max(0) + 3.0
            shape = np.ceil((hi - lo) / h).astype(int) + 1
            atlas = np.zeros(shape, dtype=np.float32)
            for tree in self.vessels:
                for start, end, radius in tree:
                    i0 = np.clip(np.floor((np.minimum(start, end) - radius - 1 - lo) / h).astype(int), 0, shape - 1)
                    i1 = np.clip(np.ceil((np.maximum(start, end) + radius + 1 - lo) / h).astype(int) + 1, 1, shape)
                    axes = [lo[d] + h * np.arange(i0[d], i1[d], dtype=np.float32) for d in range(3)]
                    p = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
                    seg = end - start
                    t = np.clip(((p - start) @ seg) / (seg @ seg), 0, 1)
                    d = np.linalg.norm(p - (start + t[..., None] * seg), axis=-1)
                    box = atlas[i0[0] : i1[0], i0[1] : i1[1], i0[2] : i1[2]]
                    np.maximum(box, np.clip(radius + 0.5 - d, 0, 1), out=box)
            self._atlas = (atlas, lo, h)
        return self._atlas

    def _vessel_density(self, pts: np.ndarray) -> np.ndarray:
        atlas, lo, h = self._vessel_atlas()
        idx = np.moveaxis((pts - lo) / h, -1, 0)
        return ndimage.map_coordinates(atlas, idx, order=1, mode="constant", cval=0.0).astype(np.float32)

    def _airways(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hx, hy, hz = self.half
        carina = np.array([0.0, 0.05 * hy, 0.35 * hz])
        top = np.array([0.0, 0.1 * hy, 1.3 * hz])
        r_trachea = 0.085 * hx
        lumen = np.zeros(pts.shape[:-1], dtype=bool)
        wall = np.zeros_like(lumen)
        tubes = [(top, carina, r_trachea)]
        for side in (0, 1):
            c, a = self.lung_centres[side], self.lung_axes[side]
            hilum = c + np.array([(0.55 if side == 0 else -0.55) * a[0], 0.1 * a[1], 0.25 * a[2]])
            tubes.append((carina, hilum, 0.7 * r_trachea))
        for start, end, radius in tubes:
            # Only points in the tube's bounding box can be near it: measure those alone.
            lo, hi = np.minimum(start, end) - radius - 1.0, np.maximum(start, end) + radius + 1.0
            near = np.ones(pts.shape[:-1], dtype=bool)
            for axis in range(3):
                near &= (pts[..., axis] >= lo[axis]) & (pts[..., axis] <= hi[axis])
            p = pts[near]
            seg = end - start
            t = np.clip(((p - start) @ seg) / (seg @ seg), 0, 1)
            d = np.linalg.norm(p - (start + t[:, None] * seg), axis=-1)
            lumen[near] |= d < radius
            wall[near] |= (d >= radius) & (d < radius + 1.0)
        return lumen, wall & ~lumen

    def _field(self, pts: np.ndarray) -> np.ndarray:
        """Smooth random field in [0, 1] that decides where disease appears first (patient-specific)."""
        rng = np.random.default_rng(self.field_seed)
        coarse = ndimage.gaussian_filter(rng.random((10, 10, 10)), 1.0)
        coarse = (coarse - coarse.min()) / (np.ptp(coarse) + 1e-9)
        idx = (pts / (2.4 * self.half) + 0.5) * 9.0
        return ndimage.map_coordinates(coarse, np.moveaxis(idx, -1, 0), order=1, mode="nearest")

    def _lesions(self, pts: np.ndarray, lung_lab: np.ndarray, depth: np.ndarray, burden: float) -> np.ndarray:
        lungs = lung_lab > 0
        z = pts[..., 2]
        hz = self.half[2]
        basal = 1.0 / (1.0 + np.exp((z - (-0.1 * hz)) / (0.25 * hz)))
        subpleural = np.exp(-depth / (0.09 * self.lung_axes.min()))
        score = basal * subpleural * (0.55 + 0.45 * self._field(pts))
        lesion = np.zeros(lung_lab.shape, dtype=np.uint8)
        if burden <= 0 or not lungs.any():
            return lesion
        values = score[lungs]
        threshold = np.quantile(values, 1.0 - burden)
        # Fixed score cut-offs between lesion types: the same tissue keeps its type over time and
        # the oldest (highest-score) disease turns into honeycombing.
        honey_cut = np.quantile(values, 1.0 - 0.25 * min(burden, 0.2))
        gg_cut = threshold + 0.35 * (honey_cut - threshold) * 0.5
        affected = lungs & (score >= threshold)
        lesion[affected & (score < gg_cut)] = LESION_LABELS["ground_glass"]
        lesion[affected & (score >= gg_cut)] = LESION_LABELS["reticulation"]
        lesion[affected & (score >= honey_cut)] = LESION_LABELS["honeycombing"]
        return lesion

    def _paint_lesions(self, hu: np.ndarray, pts: np.ndarray, lesion: np.ndarray) -> np.ndarray:
        gg = lesion == LESION_LABELS["ground_glass"]
        hu[gg] = np.maximum(hu[gg], -560.0)
        ret = lesion == LESION_LABELS["reticulation"]
        if ret.any():
            # A net of thin dense lines: where a band-pass pattern of the position crosses zero.
            p = pts[ret] / (2.2 * max(self.s, 0.25) ** 0.5)
            net = (np.sin(p[:, 0] + 0.7 * np.sin(p[:, 1])) * np.sin(p[:, 1] + 0.7 * np.sin(p[:, 2]))
                   * np.sin(p[:, 2] + 0.5 * p[:, 0]))
            hu[ret] = np.where(np.abs(net) < 0.25, -150.0, -620.0)
        honey = lesion == LESION_LABELS["honeycombing"]
        if honey.any():
            # Clustered cysts: one per cell of a jittered lattice, air inside, a dense wall around.
            pitch = 3.0 * (max(self.s, 0.25) / 0.25) ** 0.5
            q = pts[honey] / pitch
            cell = np.floor(q)
            jitter = 0.12 * np.sin(cell @ self.cyst_phase)
            d = np.linalg.norm(q - cell - 0.5 - jitter, axis=-1) * pitch
            hu[honey] = np.where(d < 0.42 * pitch, -960.0, -40.0)
        return hu


def add_acquisition_noise(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CT noise of about 18 HU SD with a short correlation length (a soft reconstruction kernel).

    Args:
        hu: noise-free image on the scanner grid.
        rng: random stream.
    """
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    return hu + (18.0 / 0.27) * ndimage.gaussian_filter(noise, 0.6)


class DetailGrid:
    """The coarser grid the anatomy is rendered on, over the same field of view as the scan, and the way back.

    Each axis keeps the scan's spacing when it is already as coarse as ``detail_mm``; otherwise it
    uses ``detail_mm``. Returning to the scan is separable (per axis), linear for images and
    nearest-neighbour for labels.

    Args:
        shape: scan grid size.
        affine: scan grid affine (axis-aligned).
        detail_mm: largest voxel size of the detail grid.
    """

    def __init__(self, shape: tuple[int, int, int], affine: np.ndarray, detail_mm: float) -> None:
        spacing = np.diag(affine)[:3]
        self.scan_shape = tuple(shape)
        self.spacing = np.maximum(spacing, detail_mm)
        extent = (np.asarray(shape) - 1) * spacing
        self.shape = tuple(int(n) for n in np.ceil(extent / self.spacing - 1e-6).astype(int) + 1)
        centre = affine[:3, 3] + extent / 2.0
        self.affine = np.diag([*self.spacing, 1.0])
        self.affine[:3, 3] = centre - (np.asarray(self.shape) - 1) / 2.0 * self.spacing
        # Position of each scan voxel along each axis, in detail-grid voxels.
        self._coords = [(affine[d, 3] + spacing[d] * np.arange(shape[d]) - self.affine[d, 3]) / self.spacing[d]
                        for d in range(3)]

    def to_scan(self, array: np.ndarray, linear: bool) -> np.ndarray:
        """Resample a detail-grid array onto the scan grid.

        Args:
            array: values on the detail grid.
            linear: linear interpolation (images); ``False`` takes the nearest voxel (labels).
        """
        out = array
        for axis, u in enumerate(self._coords):
            if out.shape[axis] == self.scan_shape[axis] and np.allclose(u, np.arange(len(u))):
                continue
            n = out.shape[axis]
            if not linear:
                out = np.take(out, np.clip(np.rint(u), 0, n - 1).astype(np.intp), axis=axis)
                continue
            i0 = np.clip(np.floor(u), 0, n - 1).astype(np.intp)
            i1 = np.minimum(i0 + 1, n - 1)
            view = [1, 1, 1]
            view[axis] = len(u)
            w = np.clip(u - i0, 0.0, 1.0).astype(np.float32).reshape(view)
            out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i1, axis=axis) * w
        return out


def voxel_grid(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """RAS coordinates (mm) of every voxel centre of a grid, shape (X, Y, Z, 3).

    Args:
        shape: grid size.
        affine: voxel-to-RAS affine.
    """
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    return idx @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def patient_grid(phantom: ChestPhantom, rng: np.random.Generator, slice_mm: Sequence[float] = SLICE_MM
                 ) -> tuple[tuple[int, int, int], np.ndarray]:
    """Voxel grid of a scan: a ``MATRIX`` x ``MATRIX`` field of view over the chest, slices from the lung
    bases to the apices.

    Args:
        phantom: the patient's anatomy.
        rng: random stream.
        slice_mm: slice spacings to draw from.
    """
    fov = 2.3 * phantom.half[0] * float(rng.uniform(0.97, 1.08))
    slice_mm = float(rng.choice(np.asarray(slice_mm, dtype=float)))
    # A smaller chest keeps real pixel sizes on a proportionally smaller matrix.
    matrix = int(round(MATRIX * min(phantom.body_scale, 1.0)))
    spacing = np.array([fov / matrix, fov / matrix, slice_mm])
    # The lungs reach from about -0.7 (bases) to +0.95 (apices) of the half height: cover them with a margin.
    bottom, top = -0.78 * phantom.half[2], 1.05 * phantom.half[2]
    shape = (matrix, matrix, int(np.ceil((top - bottom) / slice_mm)) + 1)
    affine = np.diag([*spacing, 1.0])
    affine[:2, 3] = -(matrix - 1) / 2.0 * spacing[:2]
    affine[2, 3] = bottom
    return shape, affine


def piecewise_inverse_map(
    pts: np.ndarray, phantom: ChestPhantom, lung_transforms: list[np.ndarray], body_transform: np.ndarray
) -> np.ndarray:
    """Body-frame points seen at follow-up scan points ``pts``: each lung region moved by its own affine.

    A follow-up point p shows the tissue at T_L^-1 p when it lies in the moved (dilated) region
    of lung L, the tissue at T_body^-1 p elsewhere, blended smoothly in between.

    Args:
        pts: follow-up scan points (mm).
        phantom: the patient's anatomy (defines the lung regions).
        lung_transforms: T_right, T_left mapping body-frame points to follow-up points.
        body_transform: T_body for everything outside the lungs.
    """
    inv_body = np.linalg.inv(body_transform)
    out = pts @ inv_body[:3, :3].T + inv_body[:3, 3]
    weights = []
    sources = []
    for side, transform in enumerate(lung_transforms):
        inv = np.linalg.inv(transform)
        src = pts @ inv[:3, :3].T + inv[:3, 3]
        rho = phantom.ellipsoid_radius(src, phantom.lung_centres[side], phantom.lung_axes[side])
        # Weight 1 inside the lung and a margin of 10 % of its size, fading out over the next 40 %.
        weights.append(np.clip((1.5 - rho) / 0.4, 0.0, 1.0))
        sources.append(src)
    total = np.maximum(weights[0] + weights[1], 1.0)
    rest = 1.0 - (weights[0] + weights[1]) / total
    out = out * rest[..., None]
    for w, src in zip(weights, sources):
        out += (w / total)[..., None] * src
    return out


def write_dicom_series(folder: Path, hu: np.ndarray, affine: np.ndarray, patient_id: str, uid_seed: str) -> None:
    """Write an (x, y, z) RAS HU volume as a DICOM CT series, one file per axial slice.

    Pixel data are stored as HU + 1024 with RescaleIntercept -1024, as many scanners store CT. Geometry is
    in DICOM's LPS frame. UIDs derive from ``uid_seed``, so the same cohort gives the same files.

    Args:
        folder: destination folder (created; written through a temporary folder and a rename).
        hu: volume in Hounsfield units.
        affine: voxel-to-RAS affine (axis-aligned).
        patient_id: PatientID tag.
        uid_seed: text from which the study, series and instance UIDs are derived.
    """
    import SimpleITK as sitk

    def uid(suffix: str) -> str:
        digest = int(hashlib.sha256(f"{uid_seed}/{suffix}".encode()).hexdigest()[:24], 16)
        return f"1.2.826.0.1.3680043.10.1234.{digest}"

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    # GDCM applies the RescaleIntercept tag when writing: the file stores HU + 1024, unsigned.
    stored = np.clip(np.round(hu), -1024, 64511).astype(np.int32)
    # atomic_folder would replace an existing folder
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    with atomic_folder(folder) as tmp:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        direction = (lps[:3, :3] / spacing).T.flatten()
        for k in range(hu.shape[2]):
            # SimpleITK arrays are (z, y, x); one axial slice is (1, Y, X).
            slice_img = sitk.GetImageFromArray(stored[:, :, k].T[None])
            origin = lps[:3, :3] @ np.array([0, 0, k]) + lps[:3, 3]
            slice_img.SetSpacing([float(v) for v in spacing])
            slice_img.SetOrigin([float(v) for v in origin])
            slice_img.SetDirection([float(v) for v in direction])
            tags = {
                "0008|0060": "CT", "0010|0020": patient_id, "0010|0010": patient_id,
                "0020|000d": uid("study"), "0020|000e": uid("series"), "0008|0018": uid(f"slice{k}"),
                "0020|0013": str(k + 1), "0028|1052": "-1024", "0028|1053": "1", "0028|1054": "HU",
                "0018|0050": f"{spacing[2]:.3f}", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
                "0020|0032": "\\".join(f"{v:.4f}" for v in origin),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[[0, 3, 6]], *direction[[1, 4, 7]])),
                "0008|0021": "20260101", "0008|0031": "000000", "0008|0012": "20260101", "0008|0013": "000000",
            }
            for tag, value in tags.items():
                slice_img.SetMetaData(tag, value)
            writer.SetFileName(str(tmp / f"slice_{k:04d}.dcm"))
            writer.Execute(slice_img)


def generate_patient(
    patient: Patient, rng: np.random.Generator, out_dir: Path, body_scale: float, write_dicom: bool = False,
    slice_mm: Sequence[float] = SLICE_MM,
) -> dict:
    """Render and write one patient's paired scans, labels and ground-truth transforms.

    Args:
        patient: the patient's tabular description.
        rng: the patient's random stream (after sampling the table).
        out_dir: the patient's folder.
        body_scale: 1 for an adult chest.
        write_dicom: also write the initial scan as a DICOM series in ``initial_dicom/``.
        slice_mm: slice spacings to draw from.
    """
    phantom = ChestPhantom(rng, body_scale, patient.lung_ml)
    shape, affine = patient_grid(phantom, rng, slice_mm)
    detail = DetailGrid(shape, affine, DETAIL_MM * body_scale)
    pts = voxel_grid(detail.shape, detail.affine)
    hu0, lungs0, lesions0 = phantom.render(pts, patient.burden, None)

    # Up to ~10 mm in an adult chest, shrunk with the body so the lungs never fold over the mediastinum.
    motion_mm = 10.0 * body_scale
    lung_centres = phantom.lung_centres
    lung_transforms = [random_affine(rng, c, 4.0, motion_mm, 0.03) for c in lung_centres]
    body_transform = random_affine(rng, np.zeros(3), 1.0, 0.3 * motion_mm, 0.0)
    follow_pts = piecewise_inverse_map(pts, phantom, lung_transforms, body_transform)
    hu1, lungs1, lesions1 = phantom.render(follow_pts, patient.followup_burden, None)
    # The oracle: the follow-up's anatomy in the initial scan's frame, without motion or noise. It
    # is the ceiling of any prediction and defines the new lesions exactly, with no registration error.
    hu_oracle, _, lesions_oracle = phantom.render(pts, patient.followup_burden, None)
    del pts, follow_pts
    hu0, hu1 = (add_acquisition_noise(detail.to_scan(h, linear=True), rng) for h in (hu0, hu1))
    hu_oracle = detail.to_scan(hu_oracle, linear=True)
    lungs0, lungs1, lesions0, lesions1, lesions_oracle = (
        detail.to_scan(m, linear=False) for m in (lungs0, lungs1, lesions0, lesions1, lesions_oracle))

    files = {
        "initial.nii.gz": nifti_bytes(np.round(hu0).clip(-1024, 3071).astype(np.int16), affine),
        "followup.nii.gz": nifti_bytes(np.round(hu1).clip(-1024, 3071).astype(np.int16), affine),
        "initial_lungs.nii.gz": nifti_bytes(lungs0, affine),
        "followup_lungs.nii.gz": nifti_bytes(lungs1, affine),
        "initial_lesions.nii.gz": nifti_bytes(lesions0, affine),
        "followup_lesions.nii.gz": nifti_bytes(lesions1, affine),
        "oracle_followup.nii.gz": nifti_bytes(np.round(hu_oracle).clip(-1024, 3071).astype(np.int16), affine),
        "oracle_followup_lesions.nii.gz": nifti_bytes(lesions_oracle, affine),
    }
    transforms = {
        "convention": "4x4 RAS mm matrices mapping a point of the initial scan to the same tissue point in the "
                      "follow-up scan",
        "right_lung": lung_transforms[0].tolist(),
        "left_lung": lung_transforms[1].tolist(),
        "body": body_transform.tolist(),
    }
    files["transforms.json"] = json.dumps(transforms, indent=2).encode()
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)
    if write_dicom and not (out_dir / "initial_dicom").exists():
        write_dicom_series(out_dir / "initial_dicom", np.round(hu0), affine, patient.patient_id, patient.patient_id)
    # The header keeps the affine in single precision: the statistics use what a reader gets back.
    spacing = np.linalg.norm(affine[:3, :3].astype(np.float32).astype(np.float64), axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        "shape": list(shape), "spacing": spacing.round(3).tolist(),
        "lesion_ml": float((lesions0 > 0).sum() * voxel_ml),
        "followup_lesion_ml": float((lesions1 > 0).sum() * voxel_ml),
        "lung_ml": float((lungs0 > 0).sum() * voxel_ml),
    }


TABLE_COLUMNS = ["Patient", "Weeks", "FVC", "Percent", "Age", "Sex", "SmokingStatus", "DLCO", "FollowupWeeks",
                 "FollowupFVC", "FollowupPercent", "Progression"]


def table_row(p: Patient) -> dict:
    """One row of ``lung_function.csv`` (OSIC column names)."""
    return {"Patient": p.patient_id, "Weeks": 0, "FVC": int(p.fvc), "Percent": p.percent, "Age": p.age, "Sex": p.sex,
            "SmokingStatus": p.smoking, "DLCO": p.dlco, "FollowupWeeks": int(p.weeks),
            "FollowupFVC": int(p.followup_fvc), "FollowupPercent": p.followup_percent, "Progression": p.progression}


def split_patients(
    ids: list[str], seed: int, test_fraction: float = 0.2, folds: int = 5
) -> tuple[list[str], dict[str, int]]:
    """A fixed test split and five cross-validation folds over the remaining patients.

    Args:
        ids: patient ids.
        seed: cohort seed.
        test_fraction: share of patients held out for testing.
        folds: number of cross-validation folds.
    """
    order = np.random.default_rng(np.random.SeedSequence([seed, 10**6])).permutation(len(ids))
    n_test = max(1, int(round(test_fraction * len(ids)))) if test_fraction > 0 else 0
    test = sorted(ids[i] for i in order[:n_test])
    train = [ids[i] for i in order[n_test:]]
    return test, {pid: k % folds for k, pid in enumerate(train)}


PATIENT_FILES = ("initial.nii.gz", "followup.nii.gz", "initial_lungs.nii.gz", "followup_lungs.nii.gz",
                 "initial_lesions.nii.gz", "followup_lesions.nii.gz", "oracle_followup.nii.gz",
                 "oracle_followup_lesions.nii.gz", "transforms.json")
"""What ``generate_patient`` writes (each file atomically, ``transforms.json`` last)."""


def stats_from_files(folder: Path) -> dict:
    """The image statistics ``generate_patient`` returns, read back from a patient's written files.

    Args:
        folder: the patient's folder.
    """
    import nibabel as nib

    lungs = nib.load(str(folder / "initial_lungs.nii.gz"))
    spacing = np.linalg.norm(lungs.affine[:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000.0

    def volume(name: str) -> float:
        return float((np.asarray(nib.load(str(folder / name)).dataobj) > 0).sum() * voxel_ml)

    return {"shape": list(lungs.shape), "spacing": spacing.round(3).tolist(),
            "lesion_ml": volume("initial_lesions.nii.gz"), "followup_lesion_ml": volume("followup_lesions.nii.gz"),
            "lung_ml": volume("initial_lungs.nii.gz")}


def _generate_one(job: tuple[Path, int, int, float, bool, tuple[float, ...]]) -> tuple[Patient, dict]:
    """Draw and render patient ``index`` of a cohort (a picklable unit of work for worker processes); a patient
    whose files are all on disk is kept (the table is redrawn from its random stream, the images are not)."""
    out, seed, index, body_scale, write_dicom, slice_mm = job
    rng = patient_rng(seed, index)
    patient = sample_patient(f"SYN{index:04d}", rng)
    folder = out / patient.patient_id
    written = all((folder / name).is_file() for name in PATIENT_FILES)
    if written and (not write_dicom or (folder / "initial_dicom").is_dir()):
        return patient, stats_from_files(folder)
    return patient, generate_patient(patient, rng, folder, body_scale, write_dicom, slice_mm)


def generate_cohort(
    out_dir: str | os.PathLike,
    n_patients: int = 24,
    seed: int = 0,
    body_scale: float = DEFAULT_BODY_SCALE,
    write_dicom: bool = False,
    workers: int = 1,
    test_fraction: float = 0.2,
    slice_mm: Sequence[float] = SLICE_MM,
) -> Path:
    """Write a synthetic IPF cohort (layout in docs/architecture.md); returns the datalist path.

    Patients already complete on disk are kept, so an interrupted generation resumes.

    Args:
        out_dir: cohort folder.
        n_patients: number of patients.
        seed: cohort seed; the same seed gives identical files.
        body_scale: 1 (default) for adult chests; ``SMALL_BODY_SCALE`` for the tests' small chests.
        write_dicom: also write each initial scan as a DICOM series.
        workers: patients generated at once in separate processes (each patient has its own random
            stream, so the files do not depend on it).
        test_fraction: share of patients in the test split (0 for a training-only cohort).
        slice_mm: slice spacings the scans are drawn at (the demo keeps the thicker ones, for time).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, seed, index, body_scale, write_dicom, tuple(slice_mm)) for index in range(n_patients)]
    if workers > 1 and n_patients > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=int(workers)) as pool:
            results = list(pool.map(_generate_one, jobs))
    else:
        results = [_generate_one(job) for job in jobs]
    patients = [patient for patient, _ in results]
    stats = {patient.patient_id: stat for patient, stat in results}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table_row(p) for p in patients)
    atomic_write_bytes(out / "lung_function.csv", buffer.getvalue().encode())
    test, folds = split_patients([p.patient_id for p in patients], seed, test_fraction)

    def entry(pid: str) -> dict:
        names = ("initial", "followup", "initial_lungs", "followup_lungs", "initial_lesions", "followup_lesions",
                 "oracle_followup", "oracle_followup_lesions")
        return {"patient": pid, **{k: f"{pid}/{k}.nii.gz" for k in names}}

    datalist = {
        "training": [{**entry(p.patient_id), "fold": folds[p.patient_id]} for p in patients if p.patient_id in folds],
        "testing": [entry(pid) for pid in test],
    }
    atomic_write_bytes(out / "datalist.json", json.dumps(datalist, indent=2).encode())
    atomic_write_bytes(out / "image_stats.json", json.dumps(stats, indent=2).encode())
    return out / "datalist.json"


def summarize_cohort(cohort_dir: str | os.PathLike) -> dict:
    """Summary statistics of a generated cohort (table and images).

    Args:
        cohort_dir: cohort folder.
    """
    cohort = Path(cohort_dir)
    with open(cohort / "lung_function.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    stats = json.loads((cohort / "image_stats.json").read_text(encoding="utf-8"))

    def mean_sd(values: list[float]) -> str:
        v = np.asarray(values, dtype=float)
        return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"

    prog = [r for r in rows if r["Progression"] == "1"]
    stable = [r for r in rows if r["Progression"] == "0"]

    def growth(group: list[dict]) -> str:
        if not group:
            return "n/a"
        return mean_sd([stats[r["Patient"]]["followup_lesion_ml"] - stats[r["Patient"]]["lesion_ml"] for r in group])

    decline = [100 * (float(r["FVC"]) - float(r["FollowupFVC"])) / float(r["FVC"]) for r in rows]
    spacings = np.array([s["spacing"] for s in stats.values()])
    datalist = json.loads((cohort / "datalist.json").read_text(encoding="utf-8"))
    return {
        "patients": len(rows),
        "progressors": len(prog),
        "test_patients": len(datalist["testing"]),
        "age": mean_sd([float(r["Age"]) for r in rows]),
        "male": sum(r["Sex"] == "Male" for r in rows),
        "smoking": {s: sum(r["SmokingStatus"] == s for r in rows) for s in SMOKING},
        "FVC_ml": mean_sd([float(r["FVC"]) for r in rows]),
        "FVC_percent_predicted": mean_sd([float(r["Percent"]) for r in rows]),
        "weeks_between_scans": mean_sd([float(r["FollowupWeeks"]) for r in rows]),
        "FVC_decline_percent": mean_sd(decline),
        "lesion_growth_ml_progressors": growth(prog),
        "lesion_growth_ml_stable": growth(stable),
        "lesion_ml_baseline": mean_sd([s["lesion_ml"] for s in stats.values()]),
        "lung_ml": mean_sd([s["lung_ml"] for s in stats.values()]),
        # lung volume on CT follows FVC, as in real ILD CT (the image correlate of the FVC in the text)
        "lung_ml_FVC_correlation": (float(np.corrcoef([float(r["FVC"]) for r in rows],
                                                      [stats[r["Patient"]]["lung_ml"] for r in rows])[0, 1])
                                    if len(rows) > 2 else None),
        "inplane_spacing_mm": [float(spacings[:, 0].min()), float(spacings[:, 0].max())],
        "slice_spacing_mm": [float(spacings[:, 2].min()), float(spacings[:, 2].max())],
    }


def timed_generation(out_dir: str | os.PathLike, n_patients: int, seed: int = 0, **kwargs) -> tuple[Path, float]:
    """Generate a cohort and return its datalist and the seconds per patient.

    Args:
        out_dir: cohort folder.
        n_patients: number of patients.
        seed: cohort seed.
        kwargs: further arguments of ``generate_cohort``.
    """
    start = time.perf_counter()
    datalist = generate_cohort(out_dir, n_patients, seed, **kwargs)
    return datalist, (time.perf_counter() - start) / max(n_patients, 1)
