"""Shared test fixtures: paths of the bundle and of the offline model-zoo schema."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_NAME = "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread is faster than several competing for a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def schema_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the model zoo's metadata schema, so that verification never goes online."""
    source = Path(os.environ.get("CIRRESDIFF_SCHEMA", BUNDLE_ROOT.parent / "shared" / "schemas" / SCHEMA_NAME))
    if not source.is_file():
        pytest.skip(f"model-zoo schema not found at {source}; set CIRRESDIFF_SCHEMA to a local copy")
    target = tmp_path_factory.mktemp("schema") / SCHEMA_NAME
    target.write_bytes(source.read_bytes())
    return target


@pytest.fixture(scope="session")
def raw_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic patient's raw initial CT (NIfTI, HU, its own spacing), as a user would bring it."""
    from custom.synthetic import SMALL_BODY_SCALE, generate_cohort

    cohort = tmp_path_factory.mktemp("cohort")
    generate_cohort(cohort, n_patients=1, seed=2, body_scale=SMALL_BODY_SCALE)
    return cohort / "SYN0000" / "initial.nii.gz"
