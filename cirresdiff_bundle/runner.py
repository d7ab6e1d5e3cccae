"""Running the bundle's configs from Python, exactly as ``python -m monai.bundle run`` does."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
"""The bundle folder this package was installed from (the repository root)."""

if str(BUNDLE_ROOT) not in sys.path:
    # The bundle's components live in <bundle>/custom, found on the path as MONAI bundles are.
    sys.path.insert(0, str(BUNDLE_ROOT))

from custom.grid import as_grid  # noqa: E402  (found through the path above)


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


CHECKED_BY_READER = {"grid": as_grid}
"""Config ids whose value has more than one form (a preset name or its full form): checked by what reads them."""


def _fits(value: Any, default: Any) -> bool:
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        return True  # an expression or a reference is checked when the config evaluates it
    if default is None or isinstance(default, str) and default[:1] in ("$", "@", "%"):
        return True
    if isinstance(default, Mapping) and "_target_" in default:
        return True  # a component computes the value (e.g. a setting read beside the weights): checked where it is used
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _code_strings(value: Any) -> list[str]:
    """Strings anywhere in ``value`` that MONAI's parser would execute (``$``) or import (``%``)."""
    if isinstance(value, str):
        return [value] if value[:1] in ("$", "%") else []
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _code_strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _code_strings(v)]
    return []


def check_overrides(paths: Sequence[str], overrides: dict[str, Any], allow_code: bool = True) -> None:
    """Refuse an override whose type differs from the literal value it replaces in the configs.

    Without this a ``--max_epochs ten`` surfaces as a stack trace deep inside Ignite, hours later
    for a value only read at the end of training.

    Args:
        paths: the config files, merged in order.
        overrides: config ids and their new values.
        allow_code: whether values may hold ``$`` expressions or ``%`` imports, which MONAI's parser
            executes; inference on data from outside passes ``False``.
    """
    if not allow_code:
        code = {key: found for key, value in overrides.items() if (found := _code_strings(value))}
        if code:
            raise ValueError(f"overrides hold config expressions, which would run as Python code: {code}")
    parser = ConfigParser()
    parser.read_config(list(paths))
    for key, value in overrides.items():
        if key in CHECKED_BY_READER and not (isinstance(value, str) and value[:1] in ("$", "@", "%")):
            CHECKED_BY_READER[key](value)
            continue
        if key in parser and not _fits(value, default := parser.get(key)):
            raise TypeError(
                f"config override {key}={value!r} ({type(value).__name__}) does not fit its default "
                f"{default!r} ({type(default).__name__})"
            )


def run_config(
    configs: Sequence[str], run_id: str = "run", bundle_root: str | os.PathLike = BUNDLE_ROOT, allow_code: bool = True,
    **overrides: Any,
) -> ConfigWorkflow:
    """Run a bundle workflow: the configs are merged in order, ``overrides`` replace config ids.

    Args:
        configs: config names or paths, merged left to right (later ones override).
        run_id: the id of the expression list to run (``run``, ``training``, ...).
        bundle_root: the bundle folder; passed to the configs as ``bundle_root``.
        allow_code: whether override values may hold ``$`` expressions (see ``check_overrides``).
        overrides: config ids (``#``-separated) and their new values.
    """
    paths = config_paths(configs, bundle_root)
    check_overrides(paths, overrides, allow_code)
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
