"""How people outside the project meet the bundle: model-zoo checks, MONAI Label's way of driving it,
the exported archive, the Python API and the command line. These use the shipped weights in models/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from cirresdiff_bundle import predict_followup
from cirresdiff_bundle.cli import main, root_cause
from cirresdiff_bundle.export import export_bundle
from custom.fibrosis import fibrosis_map, haa_summary, high_attenuation_area
from custom.geometry import voxel_spacing
from custom.progression import ShippedForecaster
from custom.segmentation import segment_lungs

RECORD = {"FVC": 2300, "Percent": 62.0, "Age": 71, "Sex": "Male", "SmokingStatus": "Ex-smoker"}
SMALL = {"grid": "small"}
"""The grid that holds the whole lung region of the tests' small chests (one mean-prediction pass)."""


def test_shipped_weights_load_safely_into_the_inference_network(bundle_root):
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    state = torch.load(bundle_root / "models" / "model.pt", weights_only=True)
    network.load_state_dict(state)
    assert (bundle_root / "models" / "text_encoder" / "model.safetensors").is_file()


def test_monai_label_style_inference_from_another_folder(bundle_root, raw_case, tmp_path, monkeypatch):
    """What MONAI Label's bundle infer task does (tests/test_monailabel.py runs the real server): parse keys,
    override bundle_root and the device (as a string), load model.pt, call ``inferer(image, network)`` with the
    image alone, then ``post_transforms``, whose ``MonaiLabelResultd`` makes ``pred`` the fibrosis label map."""
    monkeypatch.chdir(tmp_path)
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "device": "cpu", "output_dir": str(tmp_path / "out"), **SMALL})
    network = parser.get_parsed_content("network_def").to("cpu")
    network.load_state_dict(torch.load(bundle_root / "models" / "model.pt", weights_only=True))
    pre, inferer, post = (parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "post_transforms"))
    data = pre({"image": str(raw_case), "record": RECORD})
    pred = inferer(data["image"][None].to("cpu"), network)
    data["pred"] = pred[0]
    data = post(data)
    initial = nib.load(str(raw_case))
    assert tuple(data["followup"].shape[1:]) == initial.shape
    assert np.allclose(np.asarray(data["followup"].affine), initial.affine)
    # the result MONAI Label writes: the label map without its channel, in the initial scan's space
    assert tuple(data["pred"].shape) == initial.shape and data["pred"].dtype == torch.uint8
    assert np.allclose(np.asarray(data["pred"].affine), initial.affine)
    assert torch.equal(data["pred"], torch.as_tensor(data["fibrosis"][0]).to(torch.uint8))
    # its JSON answer: the record's text (which reached the model through the image's metadata), the numbers, files
    result = data["result"]
    assert result["patient"] == "SYN0000" and result["text"] == data["image"].meta["text"] != inferer.default_text
    assert result["fibrosis"] == data["fibrosis_summary"] and 0.0 <= result["progression_probability"] <= 1.0
    assert nib.load(result["files"]["followup"]).shape == initial.shape
    json.dumps(result)  # what MONAI Label sends back must be plain JSON
    # the same follow-up as the bundle's own inference with that record
    expected = predict_followup(raw_case, RECORD, **SMALL)[0]["followup"]
    assert np.abs(np.asarray(data["followup"][0]) - expected).max() < 0.05


def test_monai_label_style_training_overrides(bundle_root, tmp_path):
    """MONAI Label's train task: run id ``run`` with these overrides of train.json."""
    from monai.bundle import run

    prepared = tmp_path / "prepared"
    cases = []
    for i in range(3):
        (prepared / f"C{i}").mkdir(parents=True)
        mask = np.zeros((32, 32, 32), np.uint8)
        mask[6:26, 6:26, 6:26] = 1
        image = (np.random.default_rng(i).random((32, 32, 32)) * 0.3).astype(np.float32)
        for name, array in (("image", image), ("target", image + 0.05), ("mask", mask)):
            nib.save(nib.Nifti1Image(array, np.eye(4)), str(prepared / f"C{i}" / f"{name}.nii.gz"))
        files = {k: str(prepared / f"C{i}" / f"{k}.nii.gz") for k in ("image", "target", "mask")}
        cases.append({"patient": f"C{i}", **files, "record": RECORD, "followup_record": {"FollowupWeeks": 52}})
    (prepared / "datalist.json").write_text(json.dumps({"training": [], "testing": []}), encoding="utf-8")
    run(
        "run", config_file=str(bundle_root / "configs" / "train.json"), bundle_root=str(bundle_root),
        dataset_dir=str(prepared), output_dir=str(tmp_path / "out"), model_path=str(tmp_path / "out" / "model.pt"),
        **{"train#trainer#max_epochs": 1, "train#dataset#data": cases[:2], "validate#dataset#data": cases[2:],
           "train#handlers": ["@train#checkpoint", {"_target_": "StatsHandler", "output_transform": "@loss_output"}],
           "num_workers": 0, "roi_size": [32, 32, 32]},
    )
    state = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert state["trainer"] == {"epoch": 1, "iteration": 1}


def test_predict_followup_api_on_a_file_and_on_an_array(bundle_root, raw_case, tmp_path):
    result = predict_followup(raw_case, RECORD, output_dir=tmp_path / "out", **SMALL)[0]
    initial = nib.load(str(raw_case))
    assert result["followup"].shape == initial.shape and np.allclose(result["affine"], initial.affine)
    assert np.allclose(result["change"], result["followup"] - np.asarray(initial.dataobj), atol=1e-3)
    assert 0.0 <= result["progression_probability"] <= 1.0
    assert (tmp_path / "out" / "SYN0000" / "figure.png").is_file()
    assert (tmp_path / "out" / "SYN0000" / "fibrosis.png").stat().st_size > 10_000
    # the label map of custom.fibrosis, recomputed here from the two images the API returned
    lungs = segment_lungs(np.asarray(initial.dataobj, dtype=np.float32), initial.affine)
    spacing = voxel_spacing(initial.affine)
    before = high_attenuation_area(np.asarray(initial.dataobj), lungs, spacing)
    after = high_attenuation_area(result["followup"], lungs, spacing)
    assert np.array_equal(result["fibrosis"], fibrosis_map(before, after)) and after.any()
    assert result["summary"]["fibrosis"] == pytest.approx(haa_summary(before, after, lungs, spacing))
    same = predict_followup(np.asarray(initial.dataobj), RECORD, affine=initial.affine, **SMALL)[0]
    assert np.allclose(same["followup"], result["followup"], atol=1e-3)  # same seed, same input, same output
    # a longer interval: the shipped model's predicted change is linear in it (interval_scaling), so it grows
    again = predict_followup(np.asarray(initial.dataobj), RECORD, affine=initial.affine, weeks=78, **SMALL)[0]
    assert result["weeks"] == 52 and again["weeks"] == 78
    shorter = predict_followup(np.asarray(initial.dataobj), RECORD, affine=initial.affine, weeks=26, **SMALL)[0]
    later = (again["followup"] - result["followup"])[lungs > 0].mean()
    sooner = (result["followup"] - shorter["followup"])[lungs > 0].mean()
    assert later > 1.0  # HU: the lungs get denser with the time the disease has
    # 26 more weeks add about the same, from 26 or from 52 (the interval embedding bends the line a little)
    assert later == pytest.approx(sooner, rel=0.2)
    # the FVC forecast of the shipped forecaster at the interval asked for, also in prediction.json
    shipped = ShippedForecaster.load(bundle_root / "models" / "forecaster.json")
    assert result["fvc_forecast"] == pytest.approx(shipped.forecast(RECORD, 52))
    assert result["fvc_forecast"]["weeks"] == 52
    assert again["fvc_forecast"] == pytest.approx(shipped.forecast(RECORD, 78))
    assert again["fvc_forecast"]["fvc_ml"] < result["fvc_forecast"]["fvc_ml"] < RECORD["FVC"]
    written = json.loads((tmp_path / "out" / "SYN0000" / "prediction.json").read_text(encoding="utf-8"))
    assert written["fvc_forecast"] == pytest.approx(result["fvc_forecast"]) and written["weeks"] == 52
    assert predict_followup(raw_case, None, **SMALL)[0]["fvc_forecast"] is None  # no record, no forecast


def test_lungs_that_do_not_fit_the_grid_are_refused_or_predicted_as_declared_crop(raw_case, tmp_path):
    whole = predict_followup(raw_case, RECORD, output_dir=tmp_path / "whole", **SMALL)[0]["summary"]
    assert whole["coverage"]["lungs_inside_grid"] == 1.0 and not whole["coverage"]["lungs_cut_by_scan"]
    assert not whole["coverage"]["cropped"]
    # a scan that stops below the apices: recorded, the lungs inside the scan all predicted
    image = nib.load(raw_case)
    top_cut = np.asarray(image.dataobj)[:, :, : image.shape[2] * 2 // 3]
    apices = predict_followup(top_cut, RECORD, affine=image.affine, **SMALL)[0]["summary"]["coverage"]
    assert apices["lungs_cut_by_scan"] and apices["lungs_inside_grid"] == 1.0 and not apices["cropped"]
    with pytest.raises(Exception) as refused:
        predict_followup(raw_case, RECORD, grid={"size": [32, 32, 32], "spacing_mm": 1.5})
    message = str(root_cause(refused.value))
    assert re.search(r"SYN0000: only \d+\.\d % of the lungs fit the 32x32x32 grid of 1.5 mm voxels.*'grid'", message)
    cropped = predict_followup(raw_case, RECORD, output_dir=tmp_path / "crop",
                               grid={"size": [32, 32, 32], "spacing_mm": 1.5}, allow_cropped=True)[0]
    coverage = cropped["summary"]["coverage"]
    assert coverage["cropped"] and 0.0 < coverage["lungs_inside_grid"] < 0.98
    saved = json.loads((tmp_path / "crop" / "SYN0000" / "prediction.json").read_text(encoding="utf-8"))
    assert saved["coverage"] == coverage


def test_share_of_the_lungs_inside_a_grid():
    from custom.inference import lungs_inside_grid

    lungs = np.zeros((20, 10, 10), dtype=np.uint8)
    lungs[2:18, 2:8, 2:8] = 1
    half = np.diag([1.0, 1.0, 1.0, 1.0])
    half[0, 3] = 10.0  # a 10-voxel grid starting at x = 10 mm holds x = 10..17 of the lungs' 2..17
    assert lungs_inside_grid(lungs, np.eye(4), (10, 10, 10), half) == pytest.approx(8 / 16)
    assert lungs_inside_grid(lungs, np.eye(4), (20, 10, 10), np.eye(4)) == 1.0


def test_cli_predict_and_exit_codes(raw_case, tmp_path, capsys):
    with pytest.raises(SystemExit) as missing:
        main(["predict", "--input", str(tmp_path / "missing.nii.gz")])
    assert missing.value.code == 2 and "missing.nii.gz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_record:
        main(["predict", "--input", str(raw_case), "--record", json.dumps({"FVC": -3})])
    assert bad_record.value.code == 2 and "FVC" in capsys.readouterr().err
    for weeks in ("-4", "1000", "soon"):
        with pytest.raises(SystemExit) as bad_weeks:
            main(["predict", "--input", str(raw_case), "--record", json.dumps(RECORD), "--weeks", weeks])
        assert bad_weeks.value.code == 2 and "weeks must" in capsys.readouterr().err
    with pytest.raises(SystemExit) as no_fvc:
        main(["predict", "--input", str(raw_case), "--record", json.dumps({"Percent": 60, "Age": 70})])
    assert no_fvc.value.code == 2 and "the FVC forecast needs FVC" in capsys.readouterr().err
    without = predict_followup(raw_case, {"Percent": 60, "Age": 70}, forecaster_path=None, **SMALL)[0]
    assert without["fvc_forecast"] is None and without["followup"].shape == nib.load(str(raw_case)).shape
    help_text = subprocess.run([sys.executable, "-m", "cirresdiff_bundle.cli", "--help"], capture_output=True,
                               encoding="utf-8", errors="replace", env={**os.environ, "PAGER": "cat"})
    assert help_text.returncode == 0 and "predict" in help_text.stdout + help_text.stderr


def test_exported_archive_runs_inference_from_an_empty_folder(bundle_root, raw_case, tmp_path):
    archive = export_bundle(tmp_path / "bundle.zip")
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert "cirresdiff_ipf/configs/inference.json" in names and "cirresdiff_ipf/models/model.pt" in names
        assert "cirresdiff_ipf/models/classifier/model.pt" in names  # a folder of its own: MONAI Label's choices
        assert not any("/tests/" in n or "__pycache__" in n for n in names)
        z.extractall(tmp_path / "unpacked")
    folder = tmp_path / "unpacked" / "cirresdiff_ipf"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input",
           str(raw_case), "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=folder, capture_output=True, encoding="utf-8", errors="replace", timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "SYN0000" / "followup.nii.gz").is_file()


def test_export_refuses_a_second_weights_file_that_monai_label_would_offer(tmp_path):
    (tmp_path / "models").mkdir()
    for name in ("model.pt", "classifier.pt"):
        (tmp_path / "models" / name).write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"\['classifier.pt'\] beside model.pt"):
        export_bundle(tmp_path / "bundle.zip", root=tmp_path)
    assert not (tmp_path / "bundle.zip").exists()


def test_exported_program_runs_without_this_repository(bundle_root, tmp_path):
    """The ``torch.export`` program (the TorchScript alternative) is traced for one window of ``sw_roi_size``."""
    from cirresdiff_bundle.export import export_program

    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    window = tuple(parser["sw_roi_size"])
    path = export_program(tmp_path / "denoiser.pt2")
    code = ("import sys, torch; p = torch.export.load(sys.argv[1]).module(); "
            f"out = p(torch.full((1, 2, *{window}), 0.3), torch.tensor([7]), torch.zeros(1, 64, 256)); "
            "print(tuple(out.shape), float(out.mean()))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, capture_output=True,
                            encoding="utf-8", errors="replace", timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    shape, mean = result.stdout.split(") ")
    assert shape + ")" == str((1, 1, *window))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle_root / "models" / "model.pt", weights_only=True))
    with torch.no_grad():
        expected = network.eval()(torch.full((1, 2, *window), 0.3), torch.tensor([7]), torch.zeros(1, 64, 256))
    assert abs(float(mean) - float(expected.mean())) < 1e-4


def test_architecture_page_lists_every_module(bundle_root):
    """docs/architecture.md has a row for every module of custom/ and cirresdiff_bundle/ (a new module needs one)."""
    page = (bundle_root / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = [p.relative_to(bundle_root).as_posix() for folder in ("custom", "cirresdiff_bundle")
               for p in sorted((bundle_root / folder).rglob("*.py")) if p.name != "__init__.py"]
    assert len(modules) > 20
    assert [m for m in modules if f"| `{m}` |" not in page] == []
