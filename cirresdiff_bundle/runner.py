"""Running the bundle's configs from Python, exactly as ``python -m monai.bundle run`` does."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
"""The bundle folder this package was installed from (the repository root)."""

if str(BUNDLE_ROOT) not in sys.path:
    # The bundle's components live in <bundle>/custom, found on the path as MONAI bundles are.
    sys.path.insert(0, str(BUNDLE_ROOT))


def config_paths(names: Sequence[str], bundle_root: str | os.PathLike = BUNDLE_ROOT) -> list[str]:
    """Absolute paths of config files given by name (``"train"``) or path.

    Args:
        names: config names relative to ``<bundle_root>/configs`` (with or without ``.json``), or paths.
        bundle_root: the bundle folder.
    """
    paths = []
    for name in names:
        path = Path(name)
        if not path.suffix:
            path = path.with_suffix(".json")
        if not path.is_absolute() and not path.exists():
            path = Path(bundle_root) / "configs" / path
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        paths.append(str(path.resolve()))
    return paths


def run_config(
    configs: Sequence[str], run_id: str = "run", bundle_root: str | os.PathLike = BUNDLE_ROOT, **overrides: Any
) -> ConfigWorkflow:
    """Run a bundle workflow: the configs are merged in order, ``overrides`` replace config ids.

    Args:
        configs: config names or paths, merged left to right (later ones override).
        run_id: the id of the expression list to run (``run``, ``training``, ...).
        bundle_root: the bundle folder; passed to the configs as ``bundle_root``.
        overrides: config ids (``#``-separated) and their new values.
    """
    paths = config_paths(configs, bundle_root)
    workflow = ConfigWorkflow(
        config_file=paths,
        meta_file=str(Path(bundle_root) / "configs" / "metadata.json"),
        logging_file=str(Path(bundle_root) / "configs" / "logging.conf"),
        run_id=run_id,
        workflow_type=None,
        bundle_root=str(bundle_root),
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow
