"""Lung segmentation: the weight-free threshold back end and the TotalSegmentator back end."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from custom import segmentation
from custom.constants import LEFT_LUNG, LESION_LABELS, REGION_MARGIN_MM, RIGHT_LUNG
from custom.geometry import voxel_spacing
from custom.io import CTInputError, check_ct, load_ct
from custom.segmentation import dilate_mm, segment_lungs
from custom.synthetic import SMALL_BODY_SCALE, generate_cohort

MARGIN_MM = REGION_MARGIN_MM
"""The pipeline's dilation of the lungs (``configs/prepare.json``)."""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, n_patients=3, seed=0, body_scale=SMALL_BODY_SCALE)
    return folder


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def load_case(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    hu, affine = load_ct(folder / "initial.nii.gz")
    lungs = np.asarray(nib.load(folder / "initial_lungs.nii.gz").dataobj)
    lesions = np.asarray(nib.load(folder / "initial_lesions.nii.gz").dataobj)
    return hu, affine, lungs, lesions


@pytest.mark.parametrize("patient", ["SYN0000", "SYN0001", "SYN0002"])
def test_threshold_dice_and_lesion_coverage(cohort: Path, patient: str) -> None:
    hu, affine, truth, lesions = load_case(cohort / patient)
    labels = segment_lungs(hu, affine, "threshold")
    for lab in (LEFT_LUNG, RIGHT_LUNG):
        assert dice(labels == lab, truth == lab) >= 0.95
    region = dilate_mm(labels > 0, MARGIN_MM, voxel_spacing(affine))
    for name in ("reticulation", "honeycombing"):
        inside = lesions == LESION_LABELS[name]
        if inside.any():
            assert region[inside].mean() >= 0.95, name
    assert region[lesions > 0].mean() >= 0.95


@pytest.mark.parametrize("radius_mm", [0.7, 1.5, 2.1, 5.0])
def test_dilation_is_the_euclidean_distance_within_the_radius(radius_mm: float) -> None:
    """The separable dilation equals scipy's exact distance transform, radii at a multiple of a voxel size included."""
    rng = np.random.default_rng(3)
    mask = np.zeros((40, 33, 21), dtype=bool)
    mask[tuple(rng.integers(0, n, 25) for n in mask.shape)] = True
    mask[10:14, 5:9, 3:5] = True
    spacing = np.array([0.7, 0.9, 2.1])
    expected = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm
    got = dilate_mm(mask, radius_mm, spacing)
    assert got.dtype == bool and got.shape == mask.shape
    np.testing.assert_array_equal(got, expected)
    assert got.sum() > mask.sum()


def test_whole_chest_scans_are_segmented_on_pooled_pixels(cohort: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-chest-wide scan is segmented on pooled blocks: the labels keep the full grid and agree with full
    resolution."""
    hu, affine, truth, _ = load_case(cohort / "SYN0001")
    # The small chest at 3 x the in-plane pixels: 384 x 384 slices of ~0.23 mm, pooled 6 x 6 to ~1.4 mm.
    fine = np.repeat(np.repeat(hu, 3, 0), 3, 1)
    fine_affine = np.array(affine, dtype=float) @ np.diag([1 / 3, 1 / 3, 1.0, 1.0])
    fine_affine[:3, 3] = (np.asarray(affine) @ [-1 / 3, -1 / 3, 0.0, 1.0])[:3]
    seen = []
    inner = segmentation._segment_lungs_threshold
    monkeypatch.setattr(segmentation, "_segment_lungs_threshold",
                        lambda h, a, m: seen.append(h.shape) or inner(h, a, m))
    pooled = segment_lungs(fine, fine_affine, "threshold")
    assert seen == [(64, 64, fine.shape[2])] and pooled.shape == fine.shape
    monkeypatch.setattr(segmentation, "POOLED_MIN_MATRIX", 10**6)
    full = segment_lungs(fine, fine_affine, "threshold")
    # These lungs are ~45 mm wide, so a 1.4 mm block is a large share of them (an adult scan: Dice 0.980 pooled
    # against 0.985 at full resolution, docs/preregistration.md).
    for lab in (LEFT_LUNG, RIGHT_LUNG):
        assert dice(pooled == lab, full == lab) >= 0.85
        assert dice(pooled == lab, np.repeat(np.repeat(truth, 3, 0), 3, 1) == lab) >= 0.82


def test_threshold_robust_to_fov_padding_and_flipped_axes(cohort: Path) -> None:
    hu, affine, truth, _ = load_case(cohort / "SYN0000")
    # Real scanners pad outside a circular field of view with -3024 HU; check_ct clips it to air.
    x, y = np.meshgrid(np.linspace(-1, 1, hu.shape[0]), np.linspace(-1, 1, hu.shape[1]), indexing="ij")
    padded = hu.copy()
    padded[(x**2 + y**2) > 0.98] = -3024.0
    # A scan stored right-to-left: the same anatomy, x axis flipped, affine says so.
    flipped = padded[::-1].copy()
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = hu.shape[0] - 1
    flipped_affine = affine @ flip
    labels = segment_lungs(check_ct(flipped, flipped_affine, "flipped"), flipped_affine)[::-1]
    for lab in (LEFT_LUNG, RIGHT_LUNG):
        assert dice(labels == lab, truth == lab) >= 0.95


def chest(shape: tuple[int, int, int] = (80, 64, 48), gap: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """A body with two ellipsoid lungs ``gap`` voxels apart (negative: fused at the midline), on a table."""
    idx = np.indices(shape).astype(float)
    centre = (np.asarray(shape) - 1) / 2.0
    hu = np.full(shape, -1000.0)
    body = ((idx[0] - centre[0]) / 36) ** 2 + ((idx[1] - centre[1]) / 26) ** 2 <= 1
    hu[body] = 30.0
    hu[:, 2:4, :] = 300.0  # the table, below the body
    half = 14.0
    for side in (-1, 1):
        cx = centre[0] + side * (half + gap / 2)
        lung = ((idx[0] - cx) / half) ** 2 + ((idx[1] - centre[1]) / 16) ** 2 + ((idx[2] - centre[2]) / 20) ** 2 <= 1
        hu[lung] = -850.0
    return hu.astype(np.float32), np.diag([1.0, 1.0, 1.5, 1.0])


@pytest.mark.parametrize("gap", [6.0, -4.0])
def test_left_right_from_ras_x_and_fused_lungs_split(gap: float) -> None:
    hu, affine = chest(gap=gap)
    labels = segment_lungs(hu, affine)
    assert set(np.unique(labels)) == {0, LEFT_LUNG, RIGHT_LUNG}
    xs_left = np.nonzero(labels == LEFT_LUNG)[0]
    xs_right = np.nonzero(labels == RIGHT_LUNG)[0]
    # RAS: x grows towards the patient's left.
    assert xs_left.min() > xs_right.max() - 1
    assert abs(int((labels == LEFT_LUNG).sum()) - int((labels == RIGHT_LUNG).sum())) < 0.1 * (labels > 0).sum()


def test_no_lung_is_a_clear_error() -> None:
    hu, affine = chest()
    hu[hu < -500] = 40.0
    hu[:, :, :] = np.where(np.indices(hu.shape)[1] < 6, -1000.0, hu)
    with pytest.raises(CTInputError, match="no lung found"):
        segment_lungs(hu, affine)


def test_unknown_segmenter() -> None:
    hu, affine = chest()
    with pytest.raises(ValueError, match="unknown segmenter"):
        segment_lungs(hu, affine, "magic")


def weights_installed() -> bool:
    try:
        segmentation.check_totalsegmentator(fast=True)
    except RuntimeError:
        return False
    return True


def test_totalsegmentator_missing_gives_install_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    hu, affine = chest()
    if "totalsegmentator" not in sys.modules:
        monkeypatch.setitem(sys.modules, "totalsegmentator", None)  # import fails as when not installed
    with pytest.raises(RuntimeError) as info:
        segment_lungs(hu, affine, "totalsegmentator")
    message = str(info.value)
    assert "cirresdiff-bundle[totalsegmentator]" in message and "totalseg_download_weights -t total_fast" in message
    assert not (tmp_path / "home").exists(), "nothing may be created or downloaded when the weights are missing"


def fake_model(calls: list):
    """Stand-in for ``totalsegmentator.python_api.totalsegmentator``: lobes from the threshold lungs' halves."""

    def model(image: nib.Nifti1Image, output: object, **kwargs: object) -> nib.Nifti1Image:
        calls.append(kwargs)
        hu = np.asarray(image.dataobj)
        lungs = segmentation.segment_lungs_threshold(hu, image.affine)
        upper = np.indices(hu.shape)[2] >= hu.shape[2] // 2
        out = np.zeros(hu.shape, dtype=np.uint8)
        out[(lungs == LEFT_LUNG) & upper], out[(lungs == LEFT_LUNG) & ~upper] = 10, 11
        out[(lungs == RIGHT_LUNG) & upper], out[(lungs == RIGHT_LUNG) & ~upper] = 12, 14
        out[hu > 0] = 51
        return nib.Nifti1Image(out, image.affine)

    return model


def install_fake_model(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """Replace the model call; without the package, stand-in modules carry the documented lobe ids
    of task ``total`` (10, 11 left; 12, 13, 14 right)."""
    try:
        import totalsegmentator.python_api  # noqa: F401
    except ImportError:
        package = types.ModuleType("totalsegmentator")
        api = types.ModuleType("totalsegmentator.python_api")
        binary = types.ModuleType("totalsegmentator.map_to_binary")
        binary.class_map = {"total": {10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left",
                                      12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right",
                                      14: "lung_lower_lobe_right", 51: "heart"}}
        for name, module in (("totalsegmentator", package), ("totalsegmentator.python_api", api),
                             ("totalsegmentator.map_to_binary", binary)):
            monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys.modules["totalsegmentator.python_api"], "totalsegmentator", fake_model(calls),
                        raising=False)


def test_totalsegmentator_backend(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real call path; the model call is replaced by a fake only where the weights are absent."""
    hu, affine, truth, _ = load_case(cohort / "SYN0001")
    calls: list = []
    home = tmp_path / "home"
    if not weights_installed():
        monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
        monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
        install_fake_model(monkeypatch, calls)
        with pytest.raises(RuntimeError, match="weights missing.*Dataset297, Dataset298"):
            segment_lungs(hu, affine, "totalsegmentator")
        assert not calls, "the model must not run without weights"
        for task in ("Dataset297_TotalSegmentator_total_3mm_1559subj",
                     "Dataset298_TotalSegmentator_total_6mm_1559subj"):
            fold = home / "nnunet" / "results" / task / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
            fold.mkdir(parents=True)
            (fold / "checkpoint_final.pth").write_bytes(b"weights")
    labels = segment_lungs(hu, affine, "totalsegmentator", fast=True)
    for lab in (LEFT_LUNG, RIGHT_LUNG):
        assert dice(labels == lab, truth == lab) >= 0.9
    if calls:
        assert calls[0]["fast"] is True and calls[0]["skip_saving"] is True
        assert set(calls[0]["roi_subset"]) == set(segmentation.TOTALSEG_LEFT + segmentation.TOTALSEG_RIGHT)
        assert json.loads((home / "config.json").read_text(encoding="utf-8"))["send_usage_stats"] is False
