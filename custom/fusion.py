"""Fusion of lung-function text features into the denoiser's CT features (CIResDiff, Sec. 2.3).

Every fusion block maps ``(x, context)`` with ``x`` of shape (B, C, *spatial) and ``context`` of
shape (B, L, D) to a tensor shaped like ``x``; blocks are residual, so a zero context update
leaves the CT features unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StandardCrossAttention(nn.Module):
    """Cross-attention with queries from CT features and keys and values from text tokens.

    Args:
        channels: number of CT feature channels C.
        context_dim: width D of the text token features.
        num_heads: number of attention heads; must divide ``channels``.
        norm_num_groups: groups of the GroupNorm applied to the CT features before attention.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 4, norm_num_groups: int = 8) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups=min(norm_num_groups, channels), num_channels=channels, eps=1e-6)
        self.context_norm = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.out = nn.Linear(channels, channels)
        # Zero-initialised output: at the start of training the block is the identity, so adding
        # text conditioning cannot disturb a denoiser that already works without it.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        h = self.norm(x).reshape(b, c, -1).transpose(1, 2)
        ctx = self.context_norm(context.to(h.dtype))
        q, k, v = self._heads(self.to_q(h)), self._heads(self.to_k(ctx)), self._heads(self.to_v(ctx))
        att = F.scaled_dot_product_attention(q, k, v)
        att = att.transpose(1, 2).reshape(b, -1, c)
        return x + self.out(att).transpose(1, 2).reshape(x.shape)


FUSION_MODES = {"standard": StandardCrossAttention}


def build_fusion(mode: str, channels: int, context_dim: int, num_heads: int = 4, norm_num_groups: int = 8) -> nn.Module:
    """Create the fusion block named ``mode`` (one of ``FUSION_MODES``).

    Args:
        mode: fusion variant, ``"standard"`` or ``"paper"``.
        channels: number of CT feature channels C.
        context_dim: width D of the text token features.
        num_heads: number of attention heads.
        norm_num_groups: GroupNorm groups for the CT features.
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"Unknown fusion mode {mode!r}; choose one of {sorted(FUSION_MODES)}.")
    return FUSION_MODES[mode](channels, context_dim, num_heads=num_heads, norm_num_groups=norm_num_groups)
