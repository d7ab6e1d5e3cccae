"""CLIP-style pre-training of the lung-function text encoder against the initial CT (CIResDiff Sec. 2.3).

A text encoder (``transformers``) and a 3D image encoder (MONAI ResNet on the downsampled
pre-registered initial scan) are trained with the symmetric contrastive loss of CLIP (Radford et
al., ICML 2021, Eq. in Fig. 3): for a batch of N (image, text) pairs, cross-entropy over the N x N
cosine similarities scaled by a learnable temperature, image-to-text and text-to-image averaged.
Only training patients are used. The trained text encoder is then frozen and its token features
condition the denoiser.

The default text encoder is a small BERT built from scratch with the project's tokenizer (no
download); any local Hugging Face checkpoint can be configured instead, loaded offline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch
from monai.networks.nets import resnet10
from torch import nn

from custom.data import DatasetSplit, check_no_leakage
from custom.text import build_tokenizer


class TextEncoder(nn.Module):
    """Lung-function text to token features (B, L, D) and a pooled embedding (B, D).

    Args:
        pretrained: local folder (or installed model name) of a Hugging Face encoder and its
            tokenizer, loaded with ``local_files_only``; ``None`` builds the default small BERT.
        hidden_size: width D of the default encoder.
        num_layers: transformer layers of the default encoder.
        num_heads: attention heads of the default encoder.
        max_length: tokens per text (padding or truncation), the context length L.
    """

    def __init__(self, pretrained: str | os.PathLike | None = None, hidden_size: int = 256, num_layers: int = 2,
                 num_heads: int = 4, max_length: int = 64) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel

        self.max_length = max_length
        if pretrained is None:
            self.tokenizer = build_tokenizer(max_length)
            config = BertConfig(vocab_size=len(self.tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                                num_attention_heads=num_heads, intermediate_size=2 * hidden_size,
                                max_position_embeddings=max(max_length, 64), pad_token_id=self.tokenizer.pad_token_id)
            self.model = BertModel(config, add_pooling_layer=False)
        else:
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(pretrained), local_files_only=True)
                config = AutoConfig.from_pretrained(str(pretrained), local_files_only=True)
                # Only token features are used: a BERT's pooler would be loaded "newly initialized".
                extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}
                self.model = AutoModel.from_pretrained(str(pretrained), local_files_only=True, **extra)
            except (OSError, ValueError) as e:  # a missing folder reaches the hub's repo-id check: ValueError
                raise FileNotFoundError(
                    f"text encoder not found at {pretrained!r} (nothing is downloaded at run time). Train the "
                    "bundle's own with `python -m monai.bundle run --config_file configs/pretrain_clip.json`, or "
                    "put a Hugging Face checkpoint folder there."
                ) from e

    @property
    def dim(self) -> int:
        """Width D of the token features."""
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        tokens = self.tokenize(texts, device)
        features = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(features.dtype)
        pooled = (features * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return features, pooled

    def save(self, folder: str | os.PathLike) -> Path:
        """Save model (safetensors) and tokenizer so ``AutoModel``/``AutoTokenizer`` reload them offline.

        Args:
            folder: destination folder (replaced atomically).
        """
        import shutil
        import tempfile

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder


class FrozenTextEncoder(nn.Module):
    """The pre-trained text encoder as the denoiser's context provider: texts -> (B, L, D) features.

    Frozen (no gradients, eval mode) unless ``trainable`` is set.

    Args:
        path: folder written by ``TextEncoder.save`` (``models/text_encoder``) or another local checkpoint.
        device: device of the features.
        trainable: fine-tune the encoder with the denoiser instead of freezing it.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", trainable: bool = False) -> None:
        super().__init__()
        self.encoder = TextEncoder(pretrained=path).to(device)
        self.device = torch.device(device)
        self.trainable = trainable
        self.encoder.requires_grad_(trainable)
        self.encoder.train(trainable)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.encoder(texts)[0]


class CLIPModel(nn.Module):
    """Text and image encoders with projections to a shared space and a learnable temperature.

    ``forward(images, texts)`` returns the (N, N) image-to-text logits.

    Args:
        text_encoder: the text encoder to pre-train.
        embed_dim: width of the shared embedding space.
        image_channels: channels of the image input.
    """

    def __init__(self, text_encoder: TextEncoder, embed_dim: int = 128, image_channels: int = 1) -> None:
        super().__init__()
        self.text = text_encoder
        self.image = resnet10(spatial_dims=3, n_input_channels=image_channels, num_classes=embed_dim)
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
    model = model.module if hasattr(model, "module") else model
    return model.text.save(folder)
