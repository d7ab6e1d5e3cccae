"""Dataset splits: folds, the held-out test set, leakage and missing files."""

from __future__ import annotations

import json

import pytest

from custom.data import DatasetSplit, check_no_leakage


def _write(tmp_path, training, testing):
    for entry in training + testing:
        (tmp_path / entry["patient"]).mkdir(exist_ok=True)
        for key in ("image", "target", "mask"):
            (tmp_path / entry["patient"] / f"{key}.nii.gz").write_bytes(b"x")
            entry[key] = f"{entry['patient']}/{key}.nii.gz"
    (tmp_path / "datalist.json").write_text(json.dumps({"training": training, "testing": testing}), encoding="utf-8")
    return tmp_path / "datalist.json"


def _cohort(tmp_path):
    training = [{"patient": f"P{i}", "fold": i % 5} for i in range(10)]
    testing = [{"patient": f"T{i}"} for i in range(3)]
    return _write(tmp_path, training, testing)


def test_folds_partition_training_and_validation(tmp_path):
    split = DatasetSplit(_cohort(tmp_path), val_fold=2)
    train, val = split.training(), split.validation()
    assert {c["patient"] for c in val} == {"P2", "P7"}
    assert {c["patient"] for c in train} | {c["patient"] for c in val} == {f"P{i}" for i in range(10)}
    assert not {c["patient"] for c in train} & {c["patient"] for c in val}
    assert len(split.validation(1)) == 1
    assert [c["patient"] for c in split.testing()] == ["T0", "T1", "T2"]
    assert all(c["image"].startswith(str(tmp_path)) for c in train)


def test_a_test_patient_in_training_is_an_error(tmp_path):
    datalist = _write(tmp_path, [{"patient": "P0", "fold": 0}, {"patient": "T0", "fold": 1}], [{"patient": "T0"}])
    with pytest.raises(ValueError, match="test patients \\['T0'\\]"):
        DatasetSplit(datalist).training()
    with pytest.raises(ValueError, match="CLIP"):
        check_no_leakage([{"patient": "T0"}], [{"patient": "T0"}], "CLIP pre-training")


def test_missing_image_files_are_listed(tmp_path):
    datalist = _cohort(tmp_path)
    (tmp_path / "P1" / "target.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="P1/target.nii.gz"):
        DatasetSplit(datalist, val_fold=0).training()


def test_missing_datalist_without_cohort_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        DatasetSplit(tmp_path / "nope.json").ensure()
