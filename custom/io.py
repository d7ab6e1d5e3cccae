"""Reading chest CT safely and writing outputs atomically.

Reading: a DICOM series folder (slices in any order, rescale slope and intercept applied, slice
positions checked along the slice normal), or a NIfTI / NRRD / MHA file through MONAI's
``LoadImage``. Every volume comes back as float32 Hounsfield units indexed (x, y, z) with a
RAS voxel-to-world affine, the convention of MONAI and nibabel. Anything that is not a usable
chest CT gets a ``CTInputError`` naming the file and the reason.

Writing: every file (and every folder of files) goes to a temporary name beside it and is renamed
into place, so an interrupted run never leaves a half-written output that looks complete. These
writers are the bundle's only ones: ``atomic_open`` for writers that take a file object,
``atomic_write_bytes``, ``write_nifti``, ``write_json`` and ``write_png`` for content, and
``atomic_folder`` for folders.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
PADDING_HU = -1024.0
"""Scanners pad outside the field of view with -2000 or -3024 HU; values below this are clipped to it."""


class CTInputError(ValueError):
    """An input that is not a usable chest CT (missing, unreadable, wrong geometry, not CT)."""


class OutputDirError(OSError):
    """An output folder that cannot be created, cannot be written or has too little free space."""


MIN_FREE_MB = 200.0
"""Free space an output folder must have before long work starts (a demo-size run writes ~50 MB)."""


def check_output_dir(path: str | os.PathLike, min_free_mb: float = MIN_FREE_MB) -> Path:
    """Create ``path`` if needed and make sure a file can be written there and the disk has room.

    Called when a workflow is set up, so a full disk or a read-only folder fails before hours of
    work rather than at the first save.

    Args:
        path: the output folder.
        min_free_mb: free space required on its file system, in MiB.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputDirError(f"{path}: the output folder cannot be written ({e.strerror or e})") from e
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < min_free_mb:
        raise OutputDirError(f"{path}: only {free_mb:.0f} MiB free on its disk, at least {min_free_mb:.0f} MiB needed")
    return path


def _umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file in the same folder, renamed into place.

    The file is flushed to disk before the rename (without it a crash soon after can leave the new
    name pointing at an empty file on common file systems), and removed when the block raises, so
    ``path`` is always either the old file or the complete new one. For writers that take a file
    object (``torch.save``, ``zipfile.ZipFile``, ``savefig``).

    Args:
        path: destination.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the output gets the mode a plain open() would give it
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically (``atomic_open``).

    Args:
        path: destination.
        data: content.
    """
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; it replaces ``path`` when the block ends, is removed when it raises.

    For outputs that are a folder of files (a Hugging Face checkpoint, a prepared case), so that a
    folder under the final name is always complete.

    Args:
        path: destination folder; a folder already there is replaced.
    """
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700, as for atomic_open's files
        yield tmp
        # a rename cannot replace a non-empty folder
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI with a zero gzip timestamp, so equal inputs give identical bytes.

    Args:
        array: voxel data indexed (x, y, z).
        affine: voxel-to-RAS affine.
    """
    img = nib.Nifti1Image(array, affine)
    header = img.header
    header.set_xyzt_units("mm")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header["vox_offset"] = 352
    # The header, an empty extension block, then the voxels in Fortran order: what nibabel writes,
    # without its chunked conversion loop (seconds per file at 512 x 512 x 300).
    raw = header.binaryblock + b"\x00" * 4 + np.asarray(array, dtype=header.get_data_dtype()).tobytes(order="F")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=1) as gz:
        gz.write(raw)
    return buffer.getvalue()


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI file atomically.

    Args:
        path: destination (``.nii.gz``).
        array: voxel data indexed (x, y, z).
        affine: voxel-to-RAS affine.
    """
    return atomic_write_bytes(path, nifti_bytes(array, affine))


def write_json(path: str | os.PathLike, content: object) -> Path:
    """Write JSON atomically.

    Args:
        path: destination.
        content: JSON-serialisable object.
    """
    return atomic_write_bytes(path, (json.dumps(content, indent=2) + "\n").encode())


def write_png(path: str | os.PathLike, figure: object, dpi: int = 80) -> Path:
    """Save a matplotlib figure as PNG atomically.

    Args:
        path: destination.
        figure: ``matplotlib.figure.Figure``.
        dpi: resolution.
    """
    with atomic_open(path) as f:
        figure.savefig(f, format="png", dpi=dpi)
    return Path(path)


def _dicom_series_files(folder: Path) -> list[str]:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise CTInputError(f"{folder}: no readable DICOM series in this folder")
    if len(series) > 1:
        raise CTInputError(f"{folder}: {len(series)} DICOM series are mixed in this folder; give one series per folder")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    # GDCM silently leaves out a slice it cannot parse; the gap would then pass for a missing slice.
    in_series = {Path(f).resolve() for f in files}
    unread = sorted(p.name for p in folder.iterdir()
                    if p.is_file() and _looks_like_dicom(p) and p.resolve() not in in_series)
    if unread:
        raise CTInputError(f"{folder}: {len(unread)} file(s) are not readable slices of the series (truncated or "
                           f"corrupt?): {', '.join(unread[:5])}")
    return files


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _check_slice_positions(folder: Path, files: list[str]) -> None:
    """Refuse series whose slices are not stacked evenly along the slice normal (missing or duplicate
    slices, mixed thicknesses, gantry tilt)."""
    import pydicom

    if len(files) < 2:
        raise CTInputError(f"{folder}: a single-slice series is not a CT volume")
    positions, normal = [], None
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
            position = np.asarray(ds.ImagePositionPatient, dtype=float)
        except Exception as e:
            raise CTInputError(f"{f}: unreadable DICOM slice or no slice geometry ({type(e).__name__}: {e})") from e
        slice_normal = np.cross(orientation[:3], orientation[3:])
        if normal is None:
            normal = slice_normal
        elif not np.allclose(slice_normal, normal, atol=1e-3):
            raise CTInputError(f"{folder}: slices have different orientations")
        positions.append(position)
    positions = np.asarray(positions)
    along = positions @ normal
    order = np.argsort(along)
    steps = np.diff(positions[order], axis=0)
    # Slices of a tilted gantry are stacked obliquely: each step has a component inside the slice
    # plane, which readers that assume an orthogonal grid silently turn into a sheared volume.
    normal_step = np.abs(steps @ normal)
    in_plane = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    if np.any(in_plane > 0.01 * normal_step + 1e-3):
        raise CTInputError(
            f"{folder}: slices are stacked obliquely to their plane (gantry tilt of about "
            f"{np.degrees(np.arctan2(in_plane, normal_step)).max():.1f} degrees); "
            "correct the tilt first (e.g. dcm2niix, which resamples tilted series)"
        )
    gaps = np.diff(along[order])
    if np.any(gaps < 1e-3):
        raise CTInputError(f"{folder}: duplicate slices at the same position")
    if np.ptp(gaps) > 0.01 * np.median(gaps) + 1e-3:
        raise CTInputError(
            f"{folder}: slice spacing is not uniform ({gaps.min():.3f} to {gaps.max():.3f} mm): a slice is missing "
            "or the series mixes thicknesses; resample it before use"
        )


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a DICOM CT series folder as HU (x, y, z) and a RAS affine.

    Slices are ordered by their position along the slice normal (GDCM), never by file name or
    InstanceNumber; rescale slope and intercept are applied by the reader.

    Args:
        folder: folder holding one series.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    files = _dicom_series_files(folder)
    _check_slice_positions(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise CTInputError(f"{folder}: the DICOM series could not be decoded ({str(e).splitlines()[0]})") from e
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
    spacing = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = image.GetOrigin()
    return array, LPS_TO_RAS @ lps


def read_image_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI / NRRD / MHA file with MONAI's ``LoadImage`` as (x, y, z) data and a RAS affine.

    Args:
        path: image file.
    """
    from monai.transforms import LoadImage

    # Naming the reader keeps LoadImage from building every reader it knows per call, among them
    # the GPU DICOM reader that warns on each CPU-only read.
    reader = "NibabelReader" if str(path).lower().endswith((".nii", ".nii.gz")) else "ITKReader"
    try:
        image = LoadImage(reader=reader, image_only=True)(str(path))
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise CTInputError(f"{path}: unreadable or corrupt image file ({type(e).__name__}: {first_line})") from e
    return np.asarray(image, dtype=np.float32), np.asarray(image.affine, dtype=np.float64)


def check_ct(array: np.ndarray, affine: np.ndarray, source: str) -> np.ndarray:
    """Validate a CT volume and clip scanner padding; returns the cleaned HU array.

    Args:
        array: voxel values.
        affine: voxel-to-RAS affine.
        source: file or folder name used in error messages.
    """
    if array.ndim != 3:
        raise CTInputError(f"{source}: expected a 3D volume, got shape {array.shape}")
    if min(array.shape) < 8:
        raise CTInputError(
            f"{source}: volume of shape {array.shape} is too thin to be a chest CT (2D image or single slice?)"
        )
    if not np.all(np.isfinite(array)):
        bad = int((~np.isfinite(array)).sum())
        raise CTInputError(f"{source}: {bad} voxels are NaN or infinite")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise CTInputError(f"{source}: the image geometry (affine) is invalid")
    low, median, high = np.percentile(array, [1, 50, 99.9])
    if low > -500 or high > 5000 or not -1100 <= median <= 400:
        raise CTInputError(
            f"{source}: intensities (1st percentile {low:.0f}, median {median:.0f}, 99.9th {high:.0f}) are not "
            "those of a CT in Hounsfield units (no air at about -1000 HU): is it an MR image or a rescaled export?"
        )
    return np.maximum(array, PADDING_HU)


def load_ct(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a chest CT from a DICOM folder or an image file as checked HU (x, y, z) and a RAS affine.

    Args:
        path: DICOM series folder, or a NIfTI / NRRD / MHA file.
    """
    path = Path(path)
    if not path.exists():
        raise CTInputError(f"{path}: no such file or folder")
    if path.is_dir():
        array, affine = read_dicom_series(path)
    else:
        if path.stat().st_size == 0:
            raise CTInputError(f"{path}: the file is empty")
        array, affine = read_image_file(path)
    return check_ct(array, affine, str(path)), affine
