"""Diagnostic evaluation (CIResDiff Sec. 3.4): does a follow-up scan show that IPF progressed?

A ResNet sees the (initial, follow-up) pair, plus their difference, as three channels and predicts
progression (relative FVC decline >= 10 %). The difference channel is given rather than learnt
because a training split of a few dozen pairs is too small to learn an exact subtraction, and the
change between the scans is the whole signal. It is trained on real pairs of training patients
and then applied to the real test pairs and to (initial, generated follow-up) pairs: if the
generated scans carry the progression signal, the classifier's accuracy and ROC AUC on them
approach those on real pairs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine
from monai.config import KeysCollection
from monai.transforms import MapTransform
from sklearn.metrics import roc_auc_score

from custom.data import DatasetSplit, check_no_leakage
from custom.evaluation import CaseReport
from custom.io import write_json


def pair_input(initial: torch.Tensor, followup: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The classifier's input: (initial, follow-up, follow-up - initial), each area-resampled to ``size``.

    Args:
        initial: initial scan on the model grid, shape (1, H, W, D), values in [0, 1].
        followup: real or generated follow-up on the same grid, same shape.
        size: spatial size the classifier was trained at.
    """
    initial, followup = torch.as_tensor(initial).float(), torch.as_tensor(followup).float()
    if initial.shape != followup.shape:
        raise ValueError(f"initial {tuple(initial.shape)} and follow-up {tuple(followup.shape)} differ in shape")
    pair = torch.cat([initial, followup, followup - initial])[None]
    return torch.nn.functional.interpolate(pair, size=tuple(size), mode="area")[0]


class PairInputd(MapTransform):
    """Dictionary form of :func:`pair_input`: writes the three-channel input under ``name``.

    Args:
        keys: the initial and the follow-up key, in this order.
        size: spatial size of the classifier input.
        name: key of the result.
    """

    def __init__(self, keys: KeysCollection, size: Sequence[int], name: str = "image") -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"PairInputd needs two keys (initial, follow-up), got {self.keys}")
        self.size, self.name = tuple(size), name

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        d[self.name] = pair_input(d[self.keys[0]], d[self.keys[1]], self.size)
        return d


def progression_classifier() -> torch.nn.Module:
    """The diagnostic classifier of ``train_classifier.json`` and ``inference.json`` (one definition,
    so the weights one trains always load in the other): a one-block-per-stage 3D ResNet on the
    :func:`pair_input` channels, group norm (batches of a few pairs), two classes, 0.9 M parameters."""
    from monai.networks.nets import ResNet

    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128], spatial_dims=3,
                  n_input_channels=3, num_classes=2, norm=("group", {"num_groups": 8}))


def pair_cases(split: DatasetSplit, section: str, generated_dir: str | os.PathLike | None = None) -> list[dict]:
    """Classifier inputs ``{"initial", "followup", "label", "patient"}`` for one split.

    Args:
        split: the prepared dataset's splits.
        section: ``"training"`` (every training fold, real follow-ups) or ``"testing"``.
        generated_dir: folder of generated follow-ups written by ``evaluate.json``
            (``<patient>/image_followup.nii.gz``); ``None`` pairs each case with its real follow-up.
    """
    if section == "training":
        cases = split.training() + split.validation()
        check_no_leakage(cases, split.testing(), "classifier training")
    elif section == "testing":
        cases = split.testing()
    else:
        raise ValueError(f"unknown section {section!r}: use 'training' or 'testing'")
    pairs = []
    for case in cases:
        label = case.get("followup_record", {}).get("Progression")
        if label in (None, ""):
            raise KeyError(f"case {case['patient']} has no followup_record.Progression label in the datalist")
        followup = case["target"]
        if generated_dir is not None:
            followup = str(Path(generated_dir) / case["patient"] / "image_followup.nii.gz")
            if not os.path.isfile(followup):
                raise FileNotFoundError(f"no generated follow-up for {case['patient']}: {followup}")
        pairs.append({"initial": case["image"], "followup": followup, "label": int(label),
                      "patient": case["patient"]})
    return pairs


class ProgressionReport(CaseReport):
    """Ignite handler collecting progression probabilities and writing accuracy and ROC AUC.

    Attach it to the evaluator; it writes ``<output_dir>/<name>.json`` with per-case
    probabilities, accuracy at 0.5 and ROC AUC (``null`` when the test set has one class only).

    Args:
        output_dir: folder of the report.
        name: report name, e.g. ``real`` or an ablation name.
    """

    def __init__(self, output_dir: str | os.PathLike, name: str = "real") -> None:
        super().__init__()
        self.path = Path(output_dir) / f"{name}.json"
        self.name = name

    def row(self, item: Mapping, output: Mapping) -> dict:
        """Patient, label and predicted probability of progression (arguments as in ``CaseReport.row``)."""
        probability = float(torch.softmax(torch.as_tensor(output["pred"]).float().flatten(), 0)[1])
        return {"patient": item["patient"], "label": int(item["label"]), "probability": probability}

    def write(self, engine: Engine) -> dict:
        labels = np.array([r["label"] for r in self.rows])
        probs = np.array([r["probability"] for r in self.rows])
        report = {
            "name": self.name,
            "cases": len(self.rows),
            "accuracy": float(((probs >= 0.5) == labels).mean()),
            "roc_auc": float(roc_auc_score(labels, probs)) if len(set(labels.tolist())) == 2 else None,
            "per_case": self.rows,
        }
        write_json(self.path, report)
        return report
