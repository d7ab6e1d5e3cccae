"""Model-zoo style archive of the bundle folder: what the MONAI model zoo and MONAI Label download."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from cirresdiff_bundle.runner import BUNDLE_ROOT

INCLUDED = ("configs", "models", "custom", "docs", "LICENSE")
"""What a bundle consists of; tests, data, runs and the front-door package stay out."""
EXCLUDED_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}


def bundle_files(root: str | os.PathLike = BUNDLE_ROOT) -> list[Path]:
    """The files of the bundle, relative to ``root``, in a stable order.

    Args:
        root: the bundle folder.
    """
    root = Path(root)
    files = []
    for name in INCLUDED:
        path = root / name
        if path.is_file():
            files.append(Path(name))
        elif path.is_dir():
            files += [p.relative_to(root) for p in sorted(path.rglob("*"))
                      if p.is_file() and not EXCLUDED_PARTS & set(p.parts) and not p.name.startswith(".")]
    return files


def export_bundle(out: str | os.PathLike, root: str | os.PathLike = BUNDLE_ROOT, name: str = "cirresdiff_ipf") -> Path:
    """Write ``<out>`` (a .zip holding ``<name>/configs, models, custom, docs, LICENSE``) atomically.

    Args:
        out: destination archive.
        root: the bundle folder.
        name: top-level folder inside the archive (the bundle's name in the model zoo).
    """
    out, root = Path(out), Path(root)
    if not (root / "models" / "model.pt").is_file():
        raise FileNotFoundError(f"{root / 'models' / 'model.pt'} is missing: a bundle ships its weights")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for rel in bundle_files(root):
                archive.write(root / rel, f"{name}/{rel.as_posix()}")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
