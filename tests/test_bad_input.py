"""Bad input across the pipeline, one table row each: what is fed in and the error it must give.

Every row builds its bad input in a fresh folder, calls the public entry point that would meet it
in real use and checks the exception type and that the message names the file or field and the
reason. docs/reliability.md lists the same table.
"""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from cirresdiff_bundle.runner import run_config
from custom.checkpoints import load_network_weights, safe_load
from custom.clinical.text import RecordError, read_lung_function, record_to_text
from custom.data import DatasetSplit, read_datalist
from custom.io import CTInputError, OutputDirError, check_output_dir, load_ct
from custom.preregistration import ResampleToGridd
from custom.segmentation import segment_lungs
from custom.synthetic import SMALL_BODY_SCALE, generate_cohort

RECORD = {"FVC": 2300, "Percent": 62.0, "Age": 71, "Sex": "Male", "SmokingStatus": "Ex-smoker"}


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cohort = tmp_path_factory.mktemp("cohort")
    generate_cohort(cohort, n_patients=1, seed=5, write_dicom=True, body_scale=SMALL_BODY_SCALE)
    return cohort / "SYN0000"


# Builders: each takes (patient folder, empty work folder) and returns the call that must fail.

def _nifti(folder: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def _ct_like(shape=(40, 40, 40)) -> np.ndarray:
    hu = np.full(shape, -1000.0, np.float32)
    hu[4:-4, 4:-4, :] = 40.0
    return hu


def _series(patient: Path, work: Path) -> list[Path]:
    target = work / "series"
    shutil.copytree(patient / "initial_dicom", target)
    return sorted(target.iterdir())


def _edit_slices(files: list[Path], edit: Callable[[int, pydicom.Dataset], None]) -> None:
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        edit(i, ds)
        ds.save_as(f)


def _slice_positions(files: list[Path]) -> list[np.ndarray]:
    return [np.asarray(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, float) for f in files]


def nifti_missing(patient, work):
    return lambda: load_ct(work / "absent.nii.gz")


def nifti_empty(patient, work):
    (work / "scan.nii.gz").write_bytes(b"")
    return lambda: load_ct(work / "scan.nii.gz")


def nifti_truncated(patient, work):
    data = (patient / "initial.nii.gz").read_bytes()
    (work / "scan.nii.gz").write_bytes(data[: len(data) // 3])
    return lambda: load_ct(work / "scan.nii.gz")


def nifti_garbage(patient, work):
    (work / "scan.nii.gz").write_bytes(gzip.compress(np.random.default_rng(0).bytes(4096)))
    return lambda: load_ct(work / "scan.nii.gz")


def image_2d(patient, work):
    return lambda: load_ct(_nifti(work, _ct_like((64, 64, 40))[:, :, 0]))


def single_slice_volume(patient, work):
    return lambda: load_ct(_nifti(work, _ct_like((64, 64, 1))))


def image_4d(patient, work):
    return lambda: load_ct(_nifti(work, np.stack([_ct_like()] * 3, axis=-1)))


def mr_image(patient, work):
    mr = np.random.default_rng(1).uniform(0, 3000, (40, 40, 40))
    return lambda: load_ct(_nifti(work, mr))


def nan_voxels(patient, work):
    hu = _ct_like()
    hu[10, 10, 10:15] = np.nan
    return lambda: load_ct(_nifti(work, hu))


def inf_voxels(patient, work):
    hu = _ct_like()
    hu[3, 3, 3] = np.inf
    return lambda: load_ct(_nifti(work, hu))


def degenerate_affine(patient, work):
    singular = np.eye(4)
    singular[2, 2] = 0.0  # a z axis of length zero: not a geometry
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_sform(singular, code=1)
    nib.save(nib.Nifti1Image(_ct_like(), None, header), str(work / "scan.nii.gz"))
    return lambda: load_ct(work / "scan.nii.gz")


def dicom_folder_without_dicom(patient, work):
    (work / "notes.txt").write_text("not an image", encoding="utf-8")
    return lambda: load_ct(work)


def dicom_truncated_slice(patient, work):
    files = _series(patient, work)
    files[5].write_bytes(files[5].read_bytes()[:300])
    return lambda: load_ct(work / "series")


def dicom_missing_slice(patient, work):
    files = _series(patient, work)
    files[len(files) // 2].unlink()
    return lambda: load_ct(work / "series")


def dicom_duplicate_slice(patient, work):
    files = _series(patient, work)
    shutil.copy(files[4], files[4].with_name("copy_of_slice.dcm"))
    return lambda: load_ct(work / "series")


def dicom_mixed_series(patient, work):
    files = _series(patient, work)
    _edit_slices(files[::2], lambda i, ds: setattr(ds, "SeriesInstanceUID", ds.SeriesInstanceUID + ".9"))
    return lambda: load_ct(work / "series")


def dicom_gantry_tilt(patient, work):
    files = _series(patient, work)
    positions = _slice_positions(files)
    z0 = min(p[2] for p in positions)
    shift = np.tan(np.radians(15.0))

    def tilt(i: int, ds: pydicom.Dataset) -> None:
        x, y, z = positions[i]
        ds.ImagePositionPatient = [x, y + shift * (z - z0), z]

    _edit_slices(files, tilt)
    return lambda: load_ct(work / "series")


def dicom_inconsistent_spacing(patient, work):
    files = _series(patient, work)
    positions = _slice_positions(files)
    z0 = min(p[2] for p in positions)

    def stretch(i: int, ds: pydicom.Dataset) -> None:
        x, y, z = positions[i]
        ds.ImagePositionPatient = [x, y, z if z - z0 < 10 else z0 + 10 + 1.5 * (z - z0 - 10)]

    _edit_slices(files, stretch)
    return lambda: load_ct(work / "series")


def dicom_mixed_orientation(patient, work):
    files = _series(patient, work)
    _edit_slices(files[3:4], lambda i, ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    return lambda: load_ct(work / "series")


def dicom_single_slice(patient, work):
    files = _series(patient, work)
    for f in files[1:]:
        f.unlink()
    return lambda: load_ct(work / "series")


def no_lungs_in_view(patient, work):
    hu = _ct_like((64, 64, 48))
    return lambda: segment_lungs(hu, np.eye(4))


def empty_lung_mask(patient, work):
    hu, affine = load_ct(patient / "initial.nii.gz")
    data = {"image": MetaTensor(hu[None], affine=torch.as_tensor(affine)),
            "mask": MetaTensor(np.zeros((1, *hu.shape), np.uint8), affine=torch.as_tensor(affine),
                               meta={"filename_or_obj": "lungs.nii.gz"})}
    return lambda: ResampleToGridd(["image", "mask"], grid={"size": [32, 32, 32], "spacing_mm": 1.0})(data)


def _record_row(**changes):
    def build(patient, work):
        return lambda: record_to_text({**RECORD, **changes}, patient="P17")
    return build


def record_not_a_mapping(patient, work):
    return lambda: record_to_text([2300, 62], patient="P17")


def lung_function_csv_missing_column(patient, work):
    (work / "lung_function.csv").write_text("Patient,FVC,Age,Sex,SmokingStatus\nP1,2300,71,Male,Ex-smoker\n",
                                             encoding="utf-8")
    return lambda: read_lung_function(work / "lung_function.csv")


def override_wrong_type(patient, work):
    return lambda: run_config(["train"], max_epochs="ten", dataset_dir=str(work))


def override_int_for_list(patient, work):
    return lambda: run_config(["inference"], grid=48, input=str(patient / "initial.nii.gz"), output_dir=str(work))


def record_holding_code(patient, work):
    from cirresdiff_bundle import predict_followup

    return lambda: predict_followup(patient / "initial.nii.gz", {**RECORD, "Sex": "$print('this ran while loading')"})


def _tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.Conv3d(4, 1, 1))


def checkpoint_other_network(patient, work):
    torch.save(torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3), torch.nn.Conv3d(8, 1, 1)).state_dict(), work / "model.pt")
    return lambda: load_network_weights(_tiny_net(), work / "model.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def checkpoint_pickled_code(patient, work):
    with open(work / "model.pt", "wb") as f:
        pickle.dump({"network": _Payload()}, f)
    return lambda: safe_load(work / "model.pt")


def checkpoint_truncated(patient, work):
    torch.save(_tiny_net().state_dict(), work / "model.pt")
    data = (work / "model.pt").read_bytes()
    (work / "model.pt").write_bytes(data[: len(data) // 2])
    return lambda: safe_load(work / "model.pt")


def checkpoint_missing(patient, work):
    return lambda: load_network_weights(_tiny_net(), work / "model.pt")


def text_encoder_missing(patient, work):
    from custom.clinical.encoder import FrozenTextEncoder

    return lambda: FrozenTextEncoder(f"./{work.name}/text_encoder")


def _datalist(work: Path, content: dict | str) -> Path:
    path = work / "datalist.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def datalist_missing_files(patient, work):
    case = {"patient": "P1", "image": "P1/image.nii.gz", "target": "P1/target.nii.gz", "mask": "P1/mask.nii.gz",
            "record": RECORD, "fold": 0}
    path = _datalist(work, {"training": [case], "testing": []})
    return lambda: DatasetSplit(path, val_fold=None).training()


def datalist_invalid_json(patient, work):
    path = _datalist(work, '{"training": [')
    return lambda: read_datalist(path)


def datalist_without_test_split(patient, work):
    path = _datalist(work, {"training": []})
    return lambda: read_datalist(path)


def datalist_test_patient_in_training(patient, work):
    case = {"patient": "P1", "record": RECORD, "fold": 0}
    path = _datalist(work, {"training": [case], "testing": [case]})
    return lambda: DatasetSplit(path, val_fold=None).training()


def output_dir_is_a_file(patient, work):
    (work / "results").write_text("", encoding="utf-8")
    return lambda: check_output_dir(work / "results" / "run1")


def output_disk_full(patient, work):
    return lambda: check_output_dir(work, min_free_mb=float(shutil.disk_usage(work).free) / 2**20 * 1000)


BAD_INPUTS = [
    # (row, builder, exception, the message must match)
    ("NIfTI file missing", nifti_missing, CTInputError, r"absent\.nii\.gz: no such file"),
    ("NIfTI file empty", nifti_empty, CTInputError, r"scan\.nii\.gz: the file is empty"),
    ("NIfTI file truncated", nifti_truncated, CTInputError, r"scan\.nii\.gz: unreadable or corrupt"),
    ("NIfTI file of random bytes", nifti_garbage, CTInputError, r"scan\.nii\.gz: unreadable or corrupt"),
    ("2D image", image_2d, CTInputError, r"scan\.nii\.gz: expected a 3D volume"),
    ("single-slice volume", single_slice_volume, CTInputError, r"scan\.nii\.gz: .*too thin"),
    ("4D image", image_4d, CTInputError, r"scan\.nii\.gz: expected a 3D volume"),
    ("MR image (no HU range)", mr_image, CTInputError, r"scan\.nii\.gz: .*not those of a CT"),
    ("NaN voxels", nan_voxels, CTInputError, r"scan\.nii\.gz: 5 voxels are NaN or infinite"),
    ("Inf voxel", inf_voxels, CTInputError, r"scan\.nii\.gz: 1 voxels are NaN or infinite"),
    ("degenerate affine", degenerate_affine, CTInputError, r"scan\.nii\.gz: the image geometry \(affine\) is invalid"),
    ("folder without DICOM", dicom_folder_without_dicom, CTInputError, r"no readable DICOM series"),
    ("DICOM slice truncated", dicom_truncated_slice, CTInputError, r"series: 1 file\(s\) are not readable slices"),
    ("DICOM slice missing", dicom_missing_slice, CTInputError,
     r"series: slice spacing is not uniform.*a slice is missing"),
    ("DICOM slice duplicated", dicom_duplicate_slice, CTInputError, r"series: duplicate slices"),
    ("two DICOM series mixed", dicom_mixed_series, CTInputError, r"series: 2 DICOM series are mixed"),
    ("DICOM gantry tilt", dicom_gantry_tilt, CTInputError, r"series: .*gantry tilt of about 15\.0 degrees"),
    ("DICOM inconsistent spacing", dicom_inconsistent_spacing, CTInputError, r"series: slice spacing is not uniform"),
    ("DICOM slice of another orientation", dicom_mixed_orientation, CTInputError,
     r"series: slices have different orientations"),
    ("DICOM single slice", dicom_single_slice, CTInputError, r"series: a single-slice series"),
    ("no lungs in view", no_lungs_in_view, CTInputError, r"no lung found"),
    ("empty lung mask", empty_lung_mask, CTInputError, r"lungs\.nii\.gz: the lung region is empty"),
    ("record: negative FVC", _record_row(FVC=-300), RecordError, r"P17: field FVC = -300 ml is outside"),
    ("record: % predicted over 200", _record_row(Percent=250), RecordError, r"P17: field Percent = 250 .*outside"),
    ("record: absurd age", _record_row(Age=430), RecordError, r"P17: field Age = 430 years is outside"),
    ("record: non-numeric FVC", _record_row(FVC="2,300 ml"), RecordError, r"P17: field FVC must be a number"),
    ("record: NaN FVC", _record_row(FVC=float("nan")), RecordError, r"P17: field FVC is nan"),
    ("record: unknown sex", _record_row(Sex="X"), RecordError, r"P17: field Sex = 'X' is not one of"),
    ("record: unknown smoking status", _record_row(SmokingStatus="sometimes"), RecordError,
     r"P17: field SmokingStatus"),
    ("record: unknown field", _record_row(FEV1=2.1), RecordError, r"P17: unknown lung-function field\(s\) \['FEV1'\]"),
    ("record not a mapping", record_not_a_mapping, RecordError, r"P17: .*must be a mapping"),
    ("lung-function CSV without a column", lung_function_csv_missing_column, ValueError, r"missing \['Percent'\]"),
    ("config override of the wrong type", override_wrong_type, TypeError,
     r"max_epochs='ten' \(str\) does not fit its default 45"),
    ("config override: number for a list", override_int_for_list, TypeError, r"grid=48 \(int\) is not a grid"),
    ("record holding a config expression", record_holding_code, ValueError, r"would run as Python code.*record"),
    ("checkpoint of another network shape", checkpoint_other_network, ValueError, r"model\.pt do not fit this network"),
    ("checkpoint with pickled code", checkpoint_pickled_code, ValueError, r"refusing to load .*model\.pt"),
    ("checkpoint truncated", checkpoint_truncated, ValueError, r"refusing to load .*model\.pt"),
    ("checkpoint missing", checkpoint_missing, FileNotFoundError, r"checkpoint not found: .*model\.pt"),
    ("text encoder folder missing", text_encoder_missing, FileNotFoundError,
     r"text encoder not found at .*text_encoder.*pretrain_clip\.json"),
    ("datalist naming missing files", datalist_missing_files, FileNotFoundError,
     r"names files that do not exist: .*P1"),
    ("datalist not JSON", datalist_invalid_json, ValueError, r"datalist\.json is not valid JSON"),
    ("datalist without a test split", datalist_without_test_split, ValueError, r"has no 'testing' list"),
    ("test patient in the training set", datalist_test_patient_in_training, ValueError, r"test patients \['P1'\]"),
    ("output folder under a file", output_dir_is_a_file, OutputDirError, r"run1: the output folder cannot be written"),
    ("disk full", output_disk_full, OutputDirError, r"MiB free on its disk"),
]


@pytest.mark.parametrize("row, build, error, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(row, build, error, message, patient, tmp_path, capsys):
    call = build(patient, tmp_path)
    with pytest.raises(error, match=message):
        call()
    assert "this ran while loading" not in capsys.readouterr().out


def test_the_table_is_large_and_documented(bundle_root):
    assert len(BAD_INPUTS) >= 25
    documented = (bundle_root / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [row for row, *_ in BAD_INPUTS if f"| {row} |" not in documented]
    assert not missing, f"rows not in docs/reliability.md: {missing}"


def test_missing_fields_are_said_as_missing_not_refused():
    text = record_to_text({"FVC": 2300, "Sex": "Female", "Percent": ""})
    assert "forced vital capacity 2300 ml" in text and "fvc not measured" in text and "age not measured" in text


def test_failed_preparation_leaves_no_output(patient, tmp_path):
    from custom.preregistration import PairPreparer, preparation_chain

    hu = _ct_like((64, 64, 48))
    followup = _nifti(tmp_path, hu)
    out = tmp_path / "prepared" / "P1"
    with pytest.raises(CTInputError, match="no lung"):
        preparer = PairPreparer(preparation_chain(grid={"size": [32, 32, 32], "spacing_mm": 1.0}))
        preparer(patient / "initial.nii.gz", followup, out)
    assert not out.exists()
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())
