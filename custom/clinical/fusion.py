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
        h = self.norm(x).reshape(b, c, -1).transpose(1, 2)
        ctx = self.context_norm(context.to(h.dtype))
        q, k, v = self._heads(self.to_q(h)), self._heads(self.to_k(ctx)), self._heads(self.to_v(ctx))
        att = F.scaled_dot_product_attention(q, k, v)
        att = att.transpose(1, 2).reshape(b, -1, c)
        return x + self.out(att).transpose(1, 2).reshape(x.shape)


class TextModulatedSelfAttention(nn.Module):
    """The paper's Eq. 5, read dimensionally consistently: CT self-attention steered by the text.

    CIResDiff's Eq. 5 writes the fused feature as softmax(Q K^T / sqrt(d) + B) V with Q and K from
    text-modulated CT features, V from the CT features and B a learned relative position bias. We
    read "text-modulated" as FiLM (Perez et al. 2018): the mean text token gives a per-channel scale
    and shift of the normalised CT features, so the text decides *which voxels attend to which*,
    while the values, and hence what is mixed, stay the CT's own. B is a table over clipped 3D
    relative offsets (one value per head and offset, as in Swin / T5), so it works for any size.

    Attention is over all N voxels of the level (memory ~ heads x N^2): use it at coarse levels
    (8^3 - 12^3 voxels for 32^3 - 96^3 windows).

    Args:
        channels: number of CT feature channels C.
        context_dim: width D of the text token features.
        num_heads: number of attention heads; must divide ``channels``.
        norm_num_groups: groups of the GroupNorm applied to the CT features.
        max_offset: relative offsets are clipped to [-max_offset, max_offset] voxels per axis.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 4, norm_num_groups: int = 8,
                 max_offset: int = 7) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads}).")
        self.num_heads, self.max_offset = num_heads, max_offset
        self.norm = nn.GroupNorm(num_groups=min(norm_num_groups, channels), num_channels=channels, eps=1e-6)
        self.film = nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, 2 * channels))
        self.to_qk = nn.Linear(channels, 2 * channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.bias_table = nn.Parameter(torch.zeros((2 * max_offset + 1) ** 3, num_heads))
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def relative_bias(self, spatial: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """B for a grid: (heads, N, N) gathered from the table by clipped relative offsets."""
        axes = [torch.arange(s, device=device) for s in spatial]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)
        offset = (coords[:, :, None] - coords[:, None, :]).clamp(-self.max_offset, self.max_offset) + self.max_offset
        side = 2 * self.max_offset + 1
        index = (offset[0] * side + offset[1]) * side + offset[2]
        return self.bias_table[index].permute(2, 0, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        h = self.norm(x).reshape(b, c, -1).transpose(1, 2)
        scale, shift = self.film(context.to(h.dtype).mean(1)).chunk(2, dim=-1)
        modulated = h * (1 + scale[:, None]) + shift[:, None]
        q, k = (t.reshape(b, -1, self.num_heads, c // self.num_heads).transpose(1, 2)
                for t in self.to_qk(modulated).chunk(2, -1))
        v = self.to_v(h).reshape(b, -1, self.num_heads, c // self.num_heads).transpose(1, 2)
        bias = self.relative_bias(tuple(x.shape[2:]), x.device).to(q.dtype)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        att = att.transpose(1, 2).reshape(b, -1, c)
        return x + self.out(att).transpose(1, 2).reshape(x.shape)


FUSION_MODES = {"standard": StandardCrossAttention, "paper": TextModulatedSelfAttention}


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
