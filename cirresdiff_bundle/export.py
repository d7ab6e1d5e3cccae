"""Model-zoo style archive of the bundle folder: what the MONAI model zoo and MONAI Label download."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from cirresdiff_bundle.runner import BUNDLE_ROOT
from custom.io import atomic_open

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
    others = sorted(p.name for p in (root / "models").glob("*.pt") if p.name != "model.pt")
    if others:
        # MONAI Label's bundle infer task offers every models/*.pt as weights of network_def
        raise ValueError(f"{root / 'models'} holds {others} beside model.pt: MONAI Label would offer them as weights "
                         "of the network; keep other models in folders of their own (models/classifier/model.pt)")
    with atomic_open(out) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for rel in bundle_files(root):
            archive.write(root / rel, f"{name}/{rel.as_posix()}")
    return out


def export_program(out: str | os.PathLike, root: str | os.PathLike = BUNDLE_ROOT, context_length: int = 64) -> Path:
    """Export the denoiser with ``torch.export`` (a ``.pt2`` file loadable without this repository).

    ``python -m monai.bundle ckpt_export`` writes ``network_def`` as TorchScript (the model zoo's
    form; ``torch.jit`` is deprecated in PyTorch 2.x). This is the ``torch.export`` alternative of
    the denoiser call ``(x, timesteps, context)`` that the diffusion sampler makes, traced for one
    window of ``sw_roi_size`` (sliding-window inference only ever calls the network on such windows).
    Load it with ``torch.export.load(path).module()(x, timesteps, context)``.

    Args:
        out: destination ``.pt2`` file.
        root: the bundle folder (``configs/inference.json`` and ``models/model.pt``).
        context_length: number of text tokens L of the context (the text encoder's padding length).
    """
    import torch
    from monai.bundle import ConfigParser

    root, out = Path(root), Path(out)
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    network.eval()
    window = [int(s) for s in parser["sw_roi_size"]]
    example = (torch.rand(1, 2, *window), torch.tensor([7]), torch.zeros(1, context_length, parser["context_dim"]))
    program = torch.export.export(network, example)
    with atomic_open(out) as f:
        torch.export.save(program, f)
    return out
