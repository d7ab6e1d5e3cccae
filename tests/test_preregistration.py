"""Target-region pre-registration: transforms, pair and cohort preparation, config, command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from cirresdiff_bundle.cli import main
from custom.clinical.text import read_lung_function
from custom.constants import HU_WINDOW
from custom.geometry import normalize_hu, resample
from custom.grid import GRIDS
from custom.io import CTInputError, load_ct
from custom.preregistration import (
    PairPreparer,
    RegistrationQCError,
    preparation_chain,
    prepare_cohort,
)
from custom.synthetic import SMALL_BODY_SCALE, generate_cohort

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SMALL_CHAIN = preparation_chain(grid="small")
"""The preparation chain on the grid that holds the tests' small chests."""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, n_patients=3, seed=0, body_scale=SMALL_BODY_SCALE)
    return folder


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The follow-up of another, larger patient: registration must stretch the lungs to fit."""
    other = tmp_path_factory.mktemp("other")
    generate_cohort(other, n_patients=1, seed=9, body_scale=0.32)
    return other / "SYN0000" / "followup.nii.gz"


@pytest.fixture(scope="module")
def prepared(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "SYN0000"
    PairPreparer(SMALL_CHAIN)(cohort / "SYN0000" / "initial.nii.gz", cohort / "SYN0000" / "followup.nii.gz", out)
    return out


def test_pair_outputs(prepared: Path, cohort: Path) -> None:
    assert sorted(p.name for p in prepared.parent.iterdir()) == ["SYN0000"], "no temporary folder may remain"
    image, target, mask = (nib.load(prepared / f"{k}.nii.gz") for k in ("image", "target", "mask"))
    for volume in (image, target, mask):
        assert volume.shape == GRIDS["small"].size
        np.testing.assert_allclose(np.abs(np.diag(volume.affine)[:3]), GRIDS["small"].spacing_mm)
    x, y, m = image.get_fdata(), target.get_fdata(), mask.get_fdata() > 0
    assert 0.0 <= x.min() and x.max() <= 1.0 and np.all(x[~m] == 0) and np.all(y[~m] == 0)
    qc = json.loads((prepared / "qc.json").read_text(encoding="utf-8"))
    assert qc["warnings"] == [] and qc["qc_passed"] and qc["qc_failures"] == []
    assert set(qc["qc"]) == {"left_lung", "right_lung"}
    assert (prepared / "qc.png").read_bytes()[:4] == b"\x89PNG"
    # The grid lives in the initial scan's frame: the initial HU sampled (anti-aliased) at the grid's points is the
    # image.
    hu, affine = load_ct(cohort / "SYN0000" / "initial.nii.gz")
    expected = normalize_hu(resample(hu, affine, image.affine, image.shape, order=1, fill=-1000.0, antialias=True))
    np.testing.assert_allclose(x[m], expected[m], atol=1e-5)
    # Lesions are what the model must see: >= 95 % of them inside the region.
    lesions = resample(np.asarray(nib.load(cohort / "SYN0000" / "initial_lesions.nii.gz").dataobj), affine,
                       image.affine, image.shape, order=0, fill=0)
    assert m[lesions > 0].mean() >= 0.95
    # After registration the follow-up matches the initial much better than before.
    assert np.corrcoef(x[m], y[m])[0, 1] > 0.8


def test_same_inputs_identical_files(prepared: Path, cohort: Path, tmp_path: Path) -> None:
    PairPreparer(SMALL_CHAIN)(cohort / "SYN0000" / "initial.nii.gz", cohort / "SYN0000" / "followup.nii.gz",
                              tmp_path / "again")
    for name in ("image.nii.gz", "target.nii.gz", "mask.nii.gz"):
        assert (tmp_path / "again" / name).read_bytes() == (prepared / name).read_bytes(), name


@pytest.mark.parametrize("normalization", ["window", "minmax"])
def test_inference_preprocessing_matches_preparation(prepared: Path, cohort: Path, tmp_path: Path,
                                                     normalization: str) -> None:
    """inference.json puts a raw scan on the grid exactly as prepare.json prepared it, normalisation included."""
    if normalization == "window":
        reference = prepared
    else:
        reference = tmp_path / "minmax"
        PairPreparer(preparation_chain(grid="small", normalization=normalization))(
            cohort / "SYN0000" / "initial.nii.gz", cohort / "SYN0000" / "followup.nii.gz", reference)
    parser = ConfigParser()
    parser.read_config(BUNDLE_ROOT / "configs" / "inference.json")
    parser.update({"grid": "small", "normalization": normalization})
    d = parser.get_parsed_content("preprocessing")({"image": str(cohort / "SYN0000" / "initial.nii.gz")})
    np.testing.assert_allclose(np.asarray(d["image"][0]), nib.load(reference / "image.nii.gz").get_fdata(), atol=1e-6)


def test_shipped_configs_prepare_and_infer_alike() -> None:
    """The settings the model's input depends on are the same in preparation and inference."""
    prepare, inference = (json.loads((BUNDLE_ROOT / "configs" / f"{n}.json").read_text(encoding="utf-8"))
                          for n in ("prepare", "inference"))
    for key in ("grid", "normalization", "segmenter", "totalsegmentator_fast"):
        assert prepare[key] == inference[key], key


def test_inference_maps_the_prediction_back_to_the_initial_scan(cohort: Path) -> None:
    """configs/inference.json's pre- and post-processing: the model grid and back, in HU, on the initial scan's grid."""
    parser = ConfigParser()
    parser.read_config(BUNDLE_ROOT / "configs" / "inference.json")
    parser["grid"] = "small"
    initial = cohort / "SYN0000" / "initial.nii.gz"
    d = parser.get_parsed_content("preprocessing")({"image": str(initial), "patient": "SYN0000"})
    hu, affine = load_ct(initial)
    # MONAI's convention, which MONAI Label's Restored reads: the grid image's metadata describes the scan as loaded
    assert tuple(d["image"].shape[1:]) == GRIDS["small"].size != hu.shape
    assert tuple(d["image"].meta["spatial_shape"]) == hu.shape
    np.testing.assert_allclose(np.asarray(d["image"].meta["original_affine"]), affine)
    d["pred"] = d["image"].clone()  # a model that predicts no change
    d = parser.get_parsed_content("postprocessing#transforms#0")(d)
    back = d["pred"]
    assert back.shape[1:] == hu.shape and d["change"].shape == back.shape
    np.testing.assert_allclose(np.asarray(back.affine), affine)
    np.testing.assert_allclose(np.asarray(d["change"][0]), np.asarray(back[0]) - hu, atol=1e-3)
    # inside the lungs the round trip through the model grid keeps the scan, windowed; the grid cannot
    # hold texture finer than its spacing (median error ~30 HU on the synthetic scans)
    lungs = np.asarray(nib.load(cohort / "SYN0000" / "initial_lungs.nii.gz").dataobj) > 0
    error = np.abs(np.asarray(back[0])[lungs] - np.clip(hu, *HU_WINDOW)[lungs])
    assert np.median(error) < 40.0
    # outside the lung region the initial scan is returned untouched
    region = np.abs(np.asarray(d["change"][0])) > 0
    assert region.any() and not region.all()
    np.testing.assert_array_equal(np.asarray(back[0])[~region], hu[~region])
    assert np.asarray(d["pred_grid"]).shape == np.asarray(d["image"]).shape


def test_minmax_normalisation_ignores_padding() -> None:
    hu = np.array([-1024.0, -1000.0, 0.0, 1000.0])
    np.testing.assert_allclose(normalize_hu(hu, "minmax"), [0.0, 24 / 2024, 1024 / 2024, 1.0])
    region = np.array([False, True, True, False])
    np.testing.assert_allclose(normalize_hu(hu, "minmax", region=region)[1:3], [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize_hu(hu, "zscore")


def test_bad_input_leaves_nothing(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared" / "case"
    with pytest.raises(CTInputError, match="missing.nii.gz: no such file"):
        PairPreparer(SMALL_CHAIN)(cohort / "missing.nii.gz", cohort / "SYN0000" / "followup.nii.gz", out)
    assert not out.exists() and not any((tmp_path / "prepared").glob(".case*"))


def test_mismatched_patients_fail_the_qc(cohort: Path, mismatched: Path, tmp_path: Path) -> None:
    """A follow-up of another, larger patient fails the QC: written for inspection, then refused unless kept.

    (Synthetic patients of similar size share one anatomical template and cannot all be told apart;
    docs/preregistration.md gives the measured detection rate.)
    """
    initial = cohort / "SYN0000" / "initial.nii.gz"
    with pytest.raises(RegistrationQCError, match="different patients") as info:
        PairPreparer(SMALL_CHAIN)(initial, mismatched, tmp_path / "mixed")
    assert "qc.png" in str(info.value)
    qc = json.loads((tmp_path / "mixed" / "qc.json").read_text(encoding="utf-8"))
    assert not qc["qc_passed"] and any("different patients" in f for f in qc["qc_failures"])
    kept = PairPreparer(SMALL_CHAIN, keep_failed_qc=True)(initial, mismatched, tmp_path / "kept")
    assert kept["qc_failures"] == qc["qc_failures"] and not kept["qc_passed"]


def test_qc_failures_read_the_recorded_metrics() -> None:
    """The gate is a function of qc.json alone (so pairs prepared earlier are judged alike); each rule fires."""
    record = {"transforms": {"left_lung": np.eye(4).tolist()},
              "qc": {"left_lung": {"dice_before": 0.90, "dice_after": 0.95, "ncc_before": 0.5, "ncc_after": 0.8}}}
    preparer = PairPreparer(transform=lambda d: d)
    assert preparer.qc_failures(record) == []
    record["qc"]["left_lung"].update(dice_before=0.83, dice_after=0.60)
    (low, worse) = preparer.qc_failures(record)
    assert "Dice after registration 0.60 < 0.80" in low and "overlap worse (mask Dice 0.830 -> 0.600)" in worse
    record["qc"]["left_lung"].update(dice_before=0.95, dice_after=0.93, ncc_after=0.1)
    record["transforms"]["left_lung"] = np.diag([1.1, 1.1, 1.1, 1.0]).tolist()
    (worse, ncc, volume) = preparer.qc_failures(record)
    assert "0.950 -> 0.930" in worse and "NCC" in ncc and "factor 1.33" in volume


def test_cohort_gate_leaves_failed_pairs_out(cohort: Path, mismatched: Path, tmp_path: Path) -> None:
    """A pair failing the QC is not in the datalist, is in failures.json with the reason, also on resume; kept on
    request."""
    mixed = tmp_path / "cohort"
    mixed.mkdir()
    (mixed / "lung_function.csv").symlink_to(cohort / "lung_function.csv")
    for patient in ("SYN0000", "SYN0001"):
        (mixed / patient).mkdir()
        (mixed / patient / "initial.nii.gz").symlink_to(cohort / patient / "initial.nii.gz")
    (mixed / "SYN0000" / "followup.nii.gz").symlink_to(cohort / "SYN0000" / "followup.nii.gz")
    (mixed / "SYN0001" / "followup.nii.gz").symlink_to(mismatched)
    entries = [{"patient": p, "initial": f"{p}/initial.nii.gz", "followup": f"{p}/followup.nii.gz"}
               for p in ("SYN0000", "SYN0001")]
    (mixed / "datalist.json").write_text(json.dumps({"training": entries}), encoding="utf-8")

    def listed(folder: Path) -> list[str]:
        datalist = json.loads((folder / "datalist.json").read_text(encoding="utf-8"))
        return sorted(e["patient"] for e in datalist["training"])

    summary = prepare_cohort(mixed, tmp_path / "prepared", PairPreparer(SMALL_CHAIN), progress=False)
    assert summary["prepared"] == ["SYN0000"] and list(summary["failed"]) == ["SYN0001"]
    assert "registration QC failed" in summary["failed"]["SYN0001"] and listed(tmp_path / "prepared") == ["SYN0000"]
    failures = json.loads((tmp_path / "prepared" / "failures.json").read_text(encoding="utf-8"))
    assert "different patients" in failures["SYN0001"]
    # The failed pair's folder stays for inspection; a resumed run judges it again and leaves it out again.
    assert json.loads((tmp_path / "prepared" / "SYN0001" / "qc.json").read_text(encoding="utf-8"))["qc_passed"] is False
    again = prepare_cohort(mixed, tmp_path / "prepared", PairPreparer(SMALL_CHAIN), progress=False)
    assert list(again["failed"]) == ["SYN0001"] and listed(tmp_path / "prepared") == ["SYN0000"]
    kept = prepare_cohort(mixed, tmp_path / "prepared", PairPreparer(SMALL_CHAIN, keep_failed_qc=True), progress=False)
    assert kept["failed"] == {} and listed(tmp_path / "prepared") == ["SYN0000", "SYN0001"]
    assert any("different patients" in w for w in kept["warnings"]["SYN0001"])


def test_cohort_batch(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "cohort"
    broken.mkdir()
    for entry in cohort.iterdir():
        (broken / entry.name).symlink_to(entry)
    (broken / "SYN0002").unlink()
    (broken / "SYN0002").mkdir()
    for f in (cohort / "SYN0002").iterdir():
        (broken / "SYN0002" / f.name).symlink_to(f)
    (broken / "SYN0002" / "followup.nii.gz").unlink()
    (broken / "SYN0002" / "followup.nii.gz").write_bytes((cohort / "SYN0002" / "followup.nii.gz").read_bytes()[:3000])
    preparer = PairPreparer(SMALL_CHAIN)
    summary = prepare_cohort(broken, tmp_path / "prepared", preparer, progress=False)
    assert sorted(summary["prepared"]) == ["SYN0000", "SYN0001"]
    assert list(summary["failed"]) == ["SYN0002"] and "followup.nii.gz" in summary["failed"]["SYN0002"]
    assert "SYN0002 FAILED" in capsys.readouterr().out
    datalist = json.loads((tmp_path / "prepared" / "datalist.json").read_text(encoding="utf-8"))
    source = json.loads((cohort / "datalist.json").read_text(encoding="utf-8"))
    entries = [e for section in datalist.values() for e in section]
    assert sorted(e["patient"] for e in entries) == ["SYN0000", "SYN0001"]
    folds = {e["patient"]: e.get("fold") for section in source.values() for e in section}
    for section, items in datalist.items():
        for e in items:
            assert e["patient"] in {s["patient"] for s in source[section]} and e.get("fold") == folds[e["patient"]]
            assert set(e["record"]) == {"FVC", "Percent", "Age", "Sex", "SmokingStatus", "DLCO"}
            assert set(e["followup_record"]) == {"FollowupWeeks", "FollowupFVC", "FollowupPercent", "Progression"}
            assert all((tmp_path / "prepared" / e[k]).is_file() for k in ("image", "target", "mask"))
    assert json.loads((tmp_path / "prepared" / "failures.json").read_text(encoding="utf-8")).keys() == {"SYN0002"}
    again = prepare_cohort(broken, tmp_path / "prepared", preparer, progress=False)
    assert sorted(again["skipped"]) == ["SYN0000", "SYN0001"] and not again["prepared"]


def test_osic_table_with_several_visits(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(
        "Patient,Weeks,FVC,Percent,Age,Sex,SmokingStatus\n"
        "ID1,10,2000,60.5,70,Male,Ex-smoker\nID1,-3,2100,63.0,70,Male,Ex-smoker\nID1,50,1800,54.1,70,Male,Ex-smoker\n",
        encoding="utf-8")
    table = read_lung_function(tmp_path / "train.csv")
    assert table["ID1"]["record"] == {"FVC": 2100, "Percent": 63.0, "Age": 70, "Sex": "Male",
                                      "SmokingStatus": "Ex-smoker"}
    assert table["ID1"]["followup_record"] == {"FollowupWeeks": 53, "FollowupFVC": 1800, "FollowupPercent": 54.1}


def test_cli_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["prepare", "--initial", str(tmp_path / "nope.nii.gz"), "--followup", str(tmp_path / "nope2.nii.gz"),
              "--out", str(tmp_path / "out")])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "nope.nii.gz: no such file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_pair_failing_the_qc_exits_3(cohort: Path, mismatched: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """One pair failing the QC: exit status 3 and the QC reason on stderr; --keep_failed_qc keeps it (status 0)."""
    args = ["prepare", "--initial", str(cohort / "SYN0000" / "initial.nii.gz"), "--followup", str(mismatched)]
    with pytest.raises(SystemExit) as info:
        main([*args, "--out", str(tmp_path / "out")])
    assert info.value.code == 3
    err = capsys.readouterr().err
    assert "registration QC failed" in err and "different patients" in err and "Traceback" not in err
    main([*args, "--out", str(tmp_path / "kept"), "--keep_failed_qc"])
    printed = capsys.readouterr().out
    # MONAI's logging shares stdout: the command's own output is the JSON at its end.
    qc = json.loads(printed[printed.rindex('{\n  "out"'):])
    assert any("different patients" in f for f in qc["qc_failures"]) and (tmp_path / "kept" / "qc.json").is_file()


def test_config_runs_from_any_folder(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, n_patients=1, seed=5, body_scale=SMALL_BODY_SCALE)
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE_ROOT / "configs" / "prepare.json"),
         "--bundle_root", str(BUNDLE_ROOT), "--cohort_dir", str(cohort), "--prepared_dir", str(tmp_path / "prepared"),
         "--grid", '{"size": [64, 64, 64], "spacing_mm": 1.5}'],
        cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    datalist = json.loads((tmp_path / "prepared" / "datalist.json").read_text(encoding="utf-8"))
    (entry,) = [e for section in datalist.values() for e in section]
    assert nib.load(tmp_path / "prepared" / entry["image"]).shape == (64, 64, 64)
