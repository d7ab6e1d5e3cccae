"""The lung-function text encoder and the frozen context it gives the denoiser (CIResDiff Sec. 2.3, Fig. 1).

``TextEncoder`` turns the record's text (``custom.clinical.text``) into token features; it is
pre-trained against the initial CT by ``custom.clinical.pretraining`` and saved to
``models/text_encoder``. ``FrozenTextEncoder`` loads it for training and inference, where its
token features (B, L, D) are the context of the denoiser's fusion blocks (``custom.clinical.fusion``).

The default text encoder is a small BERT built from scratch with the project's tokenizer (no
download); any local Hugging Face checkpoint can be configured instead, loaded offline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from custom.clinical.text import build_tokenizer
from custom.io import atomic_folder

EncodeTexts = Callable[[Sequence[str]], torch.Tensor]
"""What the diffusion needs of a text encoder: texts in, token features (B, L, D) out (``FrozenTextEncoder``)."""


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
        with atomic_folder(folder) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        return Path(folder)


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
