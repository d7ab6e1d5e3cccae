"""The bundle meets the MONAI model zoo's checks: the metadata schema (offline) and, as
``ci/verify_bundle.py --mode full`` of Project-MONAI/model-zoo runs them, ``verify_net_in_out`` with
the metadata's shapes and ``ckpt_export`` to TorchScript of ``inference.json``'s ``network_def``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
from monai.networks.utils import copy_model_state

from conftest import SCHEMA_MD5
from custom.inferer import ResidualShiftInferer


def test_verify_metadata_offline(bundle_root, schema_copy):
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
           "--filepath", str(schema_copy), "--hash_val", SCHEMA_MD5]
    result = subprocess.run(cmd, cwd=bundle_root, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_rejects_a_broken_copy(bundle_root, schema_copy, tmp_path):
    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    del meta["network_data_format"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta), encoding="utf-8")
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(broken),
           "--filepath", str(schema_copy)]
    result = subprocess.run(cmd, cwd=bundle_root, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode != 0


def test_metadata_declares_the_packages_as_monai_reads_them_and_the_network_io(bundle_root):
    """MONAI renames ``optional_packages_version`` to ``required_packages_version`` on loading (a deprecated
    name): such a key would replace the real list, so the optional TotalSegmentator is named in the text only."""
    path = bundle_root / "configs" / "metadata.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    for key in ("monai_version", "pytorch_version", "numpy_version"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", meta[key]), key
    required = ConfigParser.load_config_files(str(path))["required_packages_version"]
    assert {"antspyx", "pytorch-ignite", "transformers"} <= set(required) and "TotalSegmentator" not in required
    assert "optional_packages_version" not in meta and "TotalSegmentator" in meta["description"]
    fmt = meta["network_data_format"]
    # an image-to-image network: the initial CT in, the follow-up out (the context is an optional keyword)
    assert list(fmt["inputs"]) == ["image", "context"]
    assert fmt["inputs"]["image"]["num_channels"] == 1 and fmt["outputs"]["pred"]["num_channels"] == 1


def _inference_parser(bundle_root: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_root)
    return parser


def _shipped_network(parser: ConfigParser, bundle_root: Path) -> torch.nn.Module:
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle_root / "models" / "model.pt", weights_only=True))
    return network.eval()


@pytest.mark.usefixtures("one_thread")
def test_model_zoo_full_mode_checks_pass_and_the_torchscript_computes_the_network(bundle_root, tmp_path):
    meta, config = str(bundle_root / "configs" / "metadata.json"), str(bundle_root / "configs" / "inference.json")
    # the two calls of ci/verify_bundle.py's verify_data_shape and verify_torchscript, arguments as there
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=str(bundle_root))
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=str(bundle_root),
                      extra_forward_args={"context": torch.zeros(1, 64, 256)})  # the optional text context
    exported = tmp_path / "verify_model.ts"
    ckpt_export(net_id="network_def", filepath=str(exported), ckpt_file=str(bundle_root / "models" / "model.pt"),
                meta_file=meta, config_file=config, bundle_root=str(bundle_root))
    extra = {"inference.json": ""}
    program = torch.jit.load(str(exported), _extra_files=extra)
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "custom.networks.MeanPredictionUNet"
    network = _shipped_network(_inference_parser(bundle_root), bundle_root)
    g = torch.Generator().manual_seed(0)
    y0, context = torch.rand(1, 1, 16, 16, 16, generator=g), torch.randn(1, 64, 256, generator=g)
    x_t = torch.rand(1, 2, 16, 16, 16, generator=g)
    with torch.no_grad():
        for args, kwargs in (((y0,), {}), ((y0,), {"context": context}), ((x_t, torch.tensor([7]), context), {})):
            assert torch.allclose(program(*args, **kwargs), network(*args, **kwargs), atol=1e-6)


def test_shipped_weights_fill_every_key_of_network_def(bundle_root):
    """ckpt_export loads model.pt with MONAI's copy_model_state when ignite is absent, which skips unknown keys
    silently: every key must land, none of the network's may stay as initialised."""
    network = _inference_parser(bundle_root).get_parsed_content("network_def")
    state = torch.load(bundle_root / "models" / "model.pt", weights_only=True)
    _, updated, unchanged = copy_model_state(network, state)
    assert updated == sorted(state) == sorted(network.state_dict()) and not unchanged


@pytest.mark.usefixtures("one_thread")
def test_image_only_network_call_is_the_inferers_mean_prediction_on_one_window(bundle_root):
    parser = _inference_parser(bundle_root)
    network = _shipped_network(parser, bundle_root)
    roi = [int(s) for s in parser["sw_roi_size"]]
    inferer = ResidualShiftInferer(parser.get_parsed_content("scheduler"), roi_size=roi, mode="constant")
    g = torch.Generator().manual_seed(1)
    y0, context = torch.rand(1, 1, *roi, generator=g), torch.randn(1, 64, 256, generator=g)
    with torch.no_grad():
        assert torch.equal(network(y0, context=context), inferer.predict_mean(y0, network, context))
