"""CLIP-style pre-training of the lung-function text encoder against the initial CT (CIResDiff Sec. 2.3).

A text encoder (``transformers``) and a 3D image encoder (MONAI ResNet on the downsampled
pre-registered initial scan) are trained with the symmetric contrastive loss of CLIP (Radford et
al., ICML 2021, Eq. in Fig. 3): for a batch of N (image, text) pairs, cross-entropy over the N x N
cosine similarities scaled by a learnable temperature, image-to-text and text-to-image averaged.
Only training patients are used. The trained text encoder is then frozen and its token features
condition the denoiser.

The text encoder itself (a small BERT by default, or a local Hugging Face checkpoint) is
``custom.clinical.encoder.TextEncoder``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch
from monai.networks.nets import ResNet
from torch import nn

from custom.checkpoints import unwrap
from custom.clinical.encoder import TextEncoder
from custom.data import DatasetSplit, check_no_leakage


def lung_image_encoder(embed_dim: int = 128, image_channels: int = 1) -> ResNet:
    """The CLIP image encoder: a one-block-per-stage 3D ResNet (widths 16-128, 0.9 M parameters).

    The stem is a stride-1 3^3 convolution without max pooling, so the small lesions of a 32^3
    lung image reach the first block. Batch norm, not group norm: group norm rescales each image
    by its own statistics and so removes the lung's overall density, the image feature lesion
    burden shows in (with group norm pre-training stayed at chance loss for 35 epochs). MONAI's
    ``resnet10`` (14.4 M parameters, 7^3 stride-2 stem) memorised 64 pre-training patients and
    stayed near chance on held-out ones (docs/clinical_text.md).

    Args:
        embed_dim: width of the shared embedding space (the encoder's output).
        image_channels: channels of the image input.
    """
    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128], spatial_dims=3,
                  n_input_channels=image_channels, conv1_t_size=3, conv1_t_stride=1, no_max_pool=True,
                  num_classes=embed_dim)


class CLIPModel(nn.Module):
    """Text and image encoders with projections to a shared space and a learnable temperature.

    ``forward(images, texts)`` returns the (N, N) image-to-text logits.

    Args:
        text_encoder: the text encoder to pre-train.
        embed_dim: width of the shared embedding space.
        image_encoder: network from images to ``embed_dim`` features; ``None`` uses :func:`lung_image_encoder`.
    """

    def __init__(self, text_encoder: TextEncoder, embed_dim: int = 128, image_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.text = text_encoder
        self.image = lung_image_encoder(embed_dim) if image_encoder is None else image_encoder
        self.text_projection = nn.Linear(text_encoder.dim, embed_dim)
        # CLIP initialises the temperature to 0.07 and learns log(1 / temperature).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text(texts)[1]), dim=-1)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def forward(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * self.embed_image(images) @ self.embed_text(texts).t()


class SymmetricContrastiveLoss(nn.Module):
    """CLIP's loss: mean of image-to-text and text-to-image cross-entropy, pair i matching text i."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = torch.arange(logits.shape[0], device=logits.device) if labels is None else labels
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class CLIPPrepareBatch(PrepareBatch):
    """Batch to ``(images, match indices, (), {"texts": texts})`` for ``SupervisedTrainer``.

    Args:
        image_key: key of the downsampled initial scans.
        text_key: key of the lung-function texts.
    """

    def __init__(self, image_key: str = "image", text_key: str = "text") -> None:
        self.image_key, self.text_key = image_key, text_key

    def __call__(self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking)
        labels = torch.arange(images.shape[0], device=images.device)
        return images, labels, (), {"texts": list(batchdata[self.text_key])}


class BatchNormRecalibration:
    """At the end of training, recompute a module's batch-norm statistics on clean (unaugmented) data.

    The running statistics batch norm uses at evaluation are an exponential average over the
    last augmented training batches of a network still changing; "precise BN" (Wu and Johnson,
    "Rethinking 'Batch' in BatchNorm", 2021, Sec. 3) replaces them by the exact population
    statistics of the final weights. In pre-training it narrowed the epoch-to-epoch swings of
    held-out retrieval (median rank 9-15 instead of 11-19 over epochs 20-45; docs/clinical_text.md).

    Attach it to the trainer before the checkpoint handler, so the final save holds the new statistics.

    Args:
        module: the network part holding the batch norms (the CLIP image encoder).
        data_loader: batches of clean training inputs.
        key: batch key of the module's input.
        device: device of the module.
    """

    def __init__(self, module: nn.Module, data_loader: Iterable, key: str = "image",
                 device: torch.device | str | None = None) -> None:
        self.module, self.data_loader, self.key, self.device = module, data_loader, key, device

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, lambda _: self())

    @torch.no_grad()
    def __call__(self) -> None:
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        was_training = self.module.training
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over every batch
        self.module.train()
        for batch in self.data_loader:
            self.module(torch.as_tensor(batch[self.key]).to(self.device))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        self.module.train(was_training)


def pretraining_cases(split: DatasetSplit) -> list[dict]:
    """Every training case (all folds) for CLIP pre-training, after checking no test patient is among them.

    Args:
        split: the prepared dataset's splits.
    """
    cases = split.training() + split.validation()
    check_no_leakage(cases, split.testing(), "CLIP pre-training")
    return cases


def save_text_encoder(model: CLIPModel, folder: str | os.PathLike) -> Path:
    """Save the pre-trained text encoder of a CLIP model for the denoiser configs.

    Args:
        model: the trained CLIP model (a DDP wrapper is unwrapped).
        folder: destination (``models/text_encoder``).
    """
    return unwrap(model).text.save(folder)


def retrieval_report(similarity: torch.Tensor, permutations: int = 10000, seed: int = 0) -> dict[str, float]:
    """Text-to-image retrieval of matched pairs and how far it is from chance.

    For each text i the images are ranked by similarity; the rank of image i is the score (1 is
    best). Chance is a random pairing of texts and images: top-k chance k/N, median-rank chance
    (N + 1) / 2, and one-sided permutation p-values of the mean rank and of the top-5 count against
    ``permutations`` random pairings evaluated on the same similarities.

    Args:
        similarity: (N texts, N images) similarities, text i matching image i.
        permutations: random pairings drawn for the p-values.
        seed: seed of the random pairings.
    """
    n = similarity.shape[0]
    if similarity.ndim != 2 or similarity.shape[1] != n or n < 2:
        raise ValueError(
            f"retrieval needs a square similarity matrix of at least 2 pairs, got {tuple(similarity.shape)}"
        )
    rank_of = similarity.argsort(dim=1, descending=True).argsort(dim=1) + 1  # [i, j]: rank of image j for text i
    ranks = rank_of.diagonal()
    generator = torch.Generator().manual_seed(seed)
    pairing = torch.rand(permutations, n, generator=generator).argsort(dim=1)
    null_ranks = rank_of[torch.arange(n)[None, :], pairing]
    top5 = int((ranks <= 5).sum())
    p_mean = (1 + int((null_ranks.float().mean(1) <= ranks.float().mean()).sum())) / (1 + permutations)
    p_top5 = (1 + int(((null_ranks <= 5).sum(1) >= top5).sum())) / (1 + permutations)
    return {"cases": n, "top1": float((ranks <= 1).float().mean()), "top1_chance": 1 / n,
            "top5": top5 / n, "top5_chance": min(5 / n, 1.0),
            "median_rank": float(ranks.float().median()), "median_rank_chance": (n + 1) / 2,
            "mean_rank": float(ranks.float().mean()), "p_value_mean_rank": p_mean, "p_value_top5": p_top5}
