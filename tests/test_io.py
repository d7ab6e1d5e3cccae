"""CT reading (DICOM series, NIfTI, NRRD, MHA) with validation, and the atomic writers."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from custom.io import (
    CTInputError,
    atomic_folder,
    atomic_open,
    check_ct,
    load_ct,
    nifti_bytes,
    write_json,
    write_nifti,
    write_png,
)
from custom.synthetic import SMALL_BODY_SCALE, generate_cohort


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic patient with its initial scan also written as a DICOM series."""
    cohort = tmp_path_factory.mktemp("cohort")
    generate_cohort(cohort, n_patients=1, seed=3, write_dicom=True, body_scale=SMALL_BODY_SCALE)
    return cohort / "SYN0000"


def copy_series(source: Path, target: Path, keep: slice = slice(None)) -> list[Path]:
    """Copy a DICOM series under scrambled file names (so that file order means nothing)."""
    target.mkdir()
    files = sorted(source.iterdir())[keep]
    rng = np.random.default_rng(0)
    copies = []
    for f, name in zip(files, rng.permutation(len(files))):
        copies.append(target / f"img{name:05d}.dcm")
        shutil.copy(f, copies[-1])
    return copies


def test_nifti_matches_nibabel(patient: Path) -> None:
    hu, affine = load_ct(patient / "initial.nii.gz")
    ref = nib.load(patient / "initial.nii.gz")
    np.testing.assert_allclose(affine, ref.affine, atol=1e-5)
    np.testing.assert_array_equal(hu, np.maximum(ref.get_fdata(), -1024))
    assert hu.dtype == np.float32


def test_dicom_shuffled_instance_numbers_read_by_position(patient: Path, tmp_path: Path) -> None:
    copies = copy_series(patient / "initial_dicom", tmp_path / "series")
    rng = np.random.default_rng(1)
    for f, number in zip(copies, rng.permutation(len(copies)) + 1):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = int(number)
        ds.save_as(f)
    hu, affine = load_ct(tmp_path / "series")
    ref_hu, ref_affine = load_ct(patient / "initial.nii.gz")
    np.testing.assert_allclose(affine, ref_affine, atol=1e-3)
    np.testing.assert_array_equal(hu, ref_hu)


def test_dicom_missing_slice_is_refused(patient: Path, tmp_path: Path) -> None:
    files = sorted((patient / "initial_dicom").iterdir())
    target = tmp_path / "gap"
    target.mkdir()
    for f in files[:5] + files[6:]:
        shutil.copy(f, target / f.name)
    with pytest.raises(CTInputError, match="not uniform"):
        load_ct(target)


def test_single_slice_series_is_refused(patient: Path, tmp_path: Path) -> None:
    copy_series(patient / "initial_dicom", tmp_path / "one", slice(0, 1))
    with pytest.raises(CTInputError, match="single-slice"):
        load_ct(tmp_path / "one")


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    with pytest.raises(CTInputError, match="no readable DICOM series"):
        load_ct(tmp_path)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_match_nifti(patient: Path, tmp_path: Path, suffix: str) -> None:
    ref_hu, ref_affine = load_ct(patient / "initial.nii.gz")
    image = sitk.GetImageFromArray(ref_hu.transpose(2, 1, 0))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ref_affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    sitk.WriteImage(image, str(tmp_path / f"scan{suffix}"))
    hu, affine = load_ct(tmp_path / f"scan{suffix}")
    np.testing.assert_allclose(affine, ref_affine, atol=1e-4)
    np.testing.assert_array_equal(hu, ref_hu)


def test_missing_empty_and_truncated_files(patient: Path, tmp_path: Path) -> None:
    with pytest.raises(CTInputError, match="no such file"):
        load_ct(tmp_path / "absent.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(CTInputError, match="empty"):
        load_ct(tmp_path / "empty.nii.gz")
    data = (patient / "initial.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CTInputError, match="cut.nii.gz: unreadable or corrupt"):
        load_ct(tmp_path / "cut.nii.gz")


def test_truncated_dicom_slice(patient: Path, tmp_path: Path) -> None:
    copies = copy_series(patient / "initial_dicom", tmp_path / "series")
    copies[3].write_bytes(copies[3].read_bytes()[:200])
    with pytest.raises(CTInputError, match="series"):
        load_ct(tmp_path / "series")


def test_mr_like_intensities_are_not_ct(tmp_path: Path) -> None:
    mr = np.random.default_rng(0).uniform(0, 4000, (32, 32, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(mr, np.eye(4)), tmp_path / "mr.nii.gz")
    with pytest.raises(CTInputError, match=r"mr.nii.gz: .*not those of a CT"):
        load_ct(tmp_path / "mr.nii.gz")


def test_scanner_padding_is_clipped_and_2d_refused() -> None:
    hu = np.full((40, 40, 20), -800.0, dtype=np.float32)
    hu[:5] = -3024.0
    hu[10:30, 10:30] = 40.0
    assert check_ct(hu, np.eye(4), "scan").min() == -1024.0
    with pytest.raises(CTInputError, match="too thin"):
        check_ct(hu[:, :, :1], np.eye(4), "scan")


def test_atomic_writers_leave_only_the_result(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    write_nifti(tmp_path / "a.nii.gz", array, affine)
    write_json(tmp_path / "a.json", {"x": 1})
    fig = plt.figure()
    write_png(tmp_path / "a.png", fig)
    plt.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.nii.gz", "a.png"]
    loaded = nib.load(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(loaded.get_fdata(), array)
    np.testing.assert_allclose(loaded.affine, affine)
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == {"x": 1}
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    # Equal inputs give identical bytes (no timestamp in the gzip header).
    assert nifti_bytes(array, affine) == nifti_bytes(array, affine)
    assert gzip.decompress(nifti_bytes(array, affine))[:4] == (348).to_bytes(4, "little")


def test_atomic_outputs_get_the_mode_of_a_plain_write_not_the_temporary_files_private_one(tmp_path: Path) -> None:
    import os
    import stat

    from custom.io import atomic_folder

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_folder(tmp_path / "case") as folder:
            (folder / "b.txt").write_text("b", encoding="utf-8")
        with open(tmp_path / "plain.txt", "w", encoding="utf-8") as f:
            f.write("plain")
        os.mkdir(tmp_path / "plain")
    finally:
        os.umask(old)

    def mode(name: str) -> int:
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    assert mode("a.json") == mode("plain.txt") == 0o640
    assert mode("case") == mode("plain") == 0o750


def test_an_interrupted_write_keeps_the_old_file_and_folder(tmp_path: Path) -> None:
    path = tmp_path / "out" / "model.pt"
    with atomic_open(path) as f:
        f.write(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_open(path) as f:
        f.write(b"half of the new")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and [p.name for p in path.parent.iterdir()] == ["model.pt"]
    folder = tmp_path / "encoder"
    with atomic_folder(folder) as tmp:
        (tmp / "weights").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_folder(folder) as tmp:
        (tmp / "weights").write_bytes(b"new")
        raise RuntimeError("killed while saving")
    assert (folder / "weights").read_bytes() == b"old"
    # a complete new folder replaces the old one, files the new one lacks included
    with atomic_folder(folder) as tmp:
        (tmp / "config").write_bytes(b"new")
    assert sorted(p.name for p in folder.iterdir()) == ["config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder", "out"]
