"""The bundle's metadata conforms to the MONAI model zoo's schema, verified offline."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import SCHEMA_MD5


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


def test_metadata_declares_both_package_lists_and_the_network_io(bundle_root):
    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    for key in ("monai_version", "pytorch_version", "numpy_version"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", meta[key]), key
    assert "antspyx" in meta["required_packages_version"]
    assert "TotalSegmentator" in meta["optional_packages_version"]
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 2 and fmt["outputs"]["pred"]["num_channels"] == 1
