"""The CIResDiff denoiser: a 3D attention U-Net with timestep embedding and text cross-attention.

Encoder and decoder levels are MONAI's timestep-conditioned residual blocks
(``DiffusionUNetResnetBlock``); the skip connections pass through additive attention gates
(Oktay et al., "Attention U-Net", MIDL 2018, Eq. 1-2) driven by the coarser decoder features;
coarse levels optionally fuse the lung-function text features (``custom.clinical.fusion``), and the
bottleneck has self-attention. The input is ``[x_t, y0]`` (2 channels), the output one channel:
the predicted follow-up x0 (residual shift) or the noise (DDPM baseline).

``MeanPredictionUNet`` is the same denoiser that, given the initial scan alone, returns the mean
prediction (``mean_prediction_input``): the image-to-image network of ``inference.json``'s
``network_def``. Every module here compiles with ``torch.jit.script``, so MONAI's ``ckpt_export``
writes it as TorchScript.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, get_timestep_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from custom.clinical.fusion import build_fusion
from custom.constants import DEFAULT_WEEKS


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018, Eq. 1-2).

    The gating signal g (decoder features, upsampled to the skip's size) and the skip features x
    give a voxel-wise coefficient alpha = sigmoid(psi(relu(W_g g + W_x x))) that scales x, so the
    decoder takes from the skip only what the coarser context finds relevant. MONAI's
    ``attentionunet.AttentionBlock`` computes the same gate but with fixed BatchNorm layers, whose
    statistics are unreliable with batches of two patches and are shared across all noise levels
    of the diffusion; this gate therefore has no normalisation.

    Args:
        skip_channels: channels of the skip features x.
        gate_channels: channels of the gating signal g.
        inter_channels: channels of the intermediate representation.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.w_x = nn.Conv3d(skip_channels, inter_channels, kernel_size=1, bias=False)
        self.w_g = nn.Conv3d(gate_channels, inter_channels, kernel_size=1)
        self.psi = nn.Conv3d(inter_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(F.relu(self.w_x(x) + self.w_g(g))))
        return x * alpha


class _SpatialSelfAttention(SpatialAttentionBlock):
    """MONAI's ``SpatialAttentionBlock`` with a forward pass that ``torch.jit.script`` compiles.

    MONAI's reshapes with ``x.reshape(*shape[:2], -1)``, a list unpacking TorchScript cannot type;
    this one names batch and channels. Same submodules, so the same state dict keys and weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        h = self.attn(self.norm(x).reshape(b, c, -1).transpose(1, 2))  # "b c h w d -> b (h w d) c"
        # MONAI's operand order: the sum takes the (channels-last) layout of the first, which the next
        # GroupNorm rounds differently, so this order keeps the outputs bit for bit
        return h.transpose(1, 2).reshape(x.shape) + x


class _Level(nn.Module):
    """Residual blocks of one resolution, each optionally followed by text fusion."""

    def __init__(self, in_ch: int, out_ch: int, temb: int, blocks: int, groups: int, fusion: nn.Module | None,
                 use_checkpointing: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            DiffusionUNetResnetBlock(3, in_ch if i == 0 else out_ch, temb, out_ch, norm_num_groups=groups)
            for i in range(blocks)
        )
        self.fusion = fusion
        self.use_checkpointing = use_checkpointing

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        # checkpointing only saves memory in training; TorchScript skips this branch, which it cannot compile
        if not torch.jit.is_scripting() and self.use_checkpointing and self.training:
            return checkpoint(self._level, h, emb, context, use_reentrant=False)
        return self._level(h, emb, context)

    def _level(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, emb)
        if self.fusion is not None and context is not None:
            h = self.fusion(h, context)
        return h


class AttentionDiffusionUNet(nn.Module):
    """3D attention U-Net denoiser of CIResDiff (Sec. 2.2 and Fig. 1), called like MONAI's DiffusionModelUNet.

    ``forward(x, timesteps, context, weeks)``: x is ``[x_t, y0]`` (B, 2, D, H, W) with sides divisible
    by ``2 ** (len(channels) - 1)``; timesteps (B,); context (B, L, context_dim) or ``None`` (then
    text fusion is skipped, e.g. for MONAI Label calls without a lung-function record); weeks (B,)
    or (1,), the interval to the follow-up, or ``None`` for ``DEFAULT_WEEKS`` (used with
    ``interval_conditioning`` only).

    Defaults: channels (32, 64, 128, 256), one residual block per level, text fusion at the two
    coarsest levels (24^3 and 12^3 for a 96^3 patch), bottleneck self-attention: 15.1 M parameters.
    Memory (scripts/benchmark_diffusion.py, counted with autograd's saved-tensor hooks under bf16
    autocast on a 48^3 patch and scaled by voxels): a training step on two 96^3 patches keeps
    ~3.5 GiB of activations, ~3.8 GiB with fp32 weights, gradients and Adam moments, so an 80 GB
    GPU has ample room (wider channels or ``use_checkpointing`` are options, not needs).

    Args:
        in_channels: input channels (x_t and y0).
        out_channels: output channels.
        channels: feature channels per resolution level.
        attention_levels: levels (same length as ``channels``) that fuse the text context.
        num_res_blocks: residual blocks per level in the encoder and the decoder.
        norm_num_groups: GroupNorm groups; must divide every entry of ``channels``.
        num_head_channels: channels per attention head of the bottleneck self-attention and fusion.
        with_conditioning: build the text-fusion blocks.
        context_dim: width of the text token features.
        fusion_mode: ``"standard"`` or ``"paper"`` (see ``custom.clinical.fusion``).
        bottleneck_attention: self-attention over the voxels of the coarsest level (global
            context across the lungs at 1/8 resolution, cheap there: 12^3 tokens for a 96^3 patch).
        residual_output: add the conditioning image (input channel 1, y0) to the output, so the
            network predicts x0 as y0 plus a learned change. It still predicts x0 (CIResDiff's
            f(x_t, y0, t)); the skip only spares it from learning to copy y0's texture. Use it for
            x0 prediction (residual shift), not for noise prediction (DDPM baseline).
        interval_conditioning: condition every residual block on the interval to the follow-up: an
            MLP of weeks / DEFAULT_WEEKS - 1 added to the timestep embedding, as the timestep itself
            conditions the blocks (how much the disease advances depends on the time it has). Its
            last layer starts at zero, so weights trained without it load (``load_network_weights``'s
            ``new_modules``) and predict exactly as before until fine-tuning teaches it.
        interval_scaling: make the predicted change linear in the interval (needs ``residual_output``):
            x0 = y0 + s + (weeks / DEFAULT_WEEKS) d, where d is the output head's change per
            DEFAULT_WEEKS (what a network trained without it predicts at the usual interval) and s a
            zero-initialised, time-independent head (texture, denoising). The disease advances
            with the time it has, as the cohort's does (``custom.synthetic.sample_patient``: decline
            = yearly rate x weeks / 52) and as IPF's FVC decline is modelled over a year or two; an
            embedding alone has to learn that from the spread of the training intervals.
        pass_through: (T, 3) per-step coefficients (a_t, b_t, k_t) from
            ``ResidualShiftScheduler.pass_through_coefficients``: the output becomes
            a_t x_t + b_t y0 + k_t f (f: the network's own output), EDM's preconditioning, so that a
            nearly clean x_t passes through and the network corrects it. ``None``: the output is f.
            A buffer of the state dict, so weights trained with it carry it and refuse to load into
            a network without it (and the other way round); without it the state dict is the one of
            networks from before it existed.
        use_checkpointing: recompute each level's activations in the backward pass to save memory.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        attention_levels: Sequence[bool] = (False, False, True, True),
        num_res_blocks: int = 1,
        norm_num_groups: int = 8,
        num_head_channels: int = 32,
        with_conditioning: bool = True,
        context_dim: int = 256,
        fusion_mode: str = "standard",
        bottleneck_attention: bool = True,
        residual_output: bool = False,
        interval_conditioning: bool = False,
        interval_scaling: bool = False,
        pass_through: torch.Tensor | None = None,
        use_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        for name, flag in (("with_conditioning", with_conditioning), ("residual_output", residual_output),
                           ("interval_conditioning", interval_conditioning), ("interval_scaling", interval_scaling)):
            if not isinstance(flag, bool):
                # `python -m monai.bundle run ... --use_text false` passes the string "false", which is true
                raise TypeError(f"{name} must be True or False, got {flag!r}; on a monai.bundle command line write "
                                "True or False with a capital letter (lowercase true/false arrive as strings)")
        if interval_scaling and not residual_output:
            raise ValueError("interval_scaling scales the predicted change, so it needs residual_output=True.")
        if len(attention_levels) != len(channels):
            raise ValueError("attention_levels must have one entry per level of channels.")
        if any(c % norm_num_groups for c in channels):
            raise ValueError(f"norm_num_groups ({norm_num_groups}) must divide every channel count {tuple(channels)}.")
        self.channels = tuple(channels)
        self.residual_output = residual_output
        temb = channels[0] * 4
        self.time_embed = nn.Sequential(nn.Linear(channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))
        self.interval_embed = None
        self.default_weeks = DEFAULT_WEEKS  # an attribute: TorchScript reads no module-level floats
        if interval_conditioning:
            self.interval_embed = nn.Sequential(nn.Linear(1, temb), nn.SiLU(), nn.Linear(temb, temb))
            nn.init.zeros_(self.interval_embed[-1].weight)
            nn.init.zeros_(self.interval_embed[-1].bias)
        self.stem = nn.Conv3d(in_channels, channels[0], kernel_size=3, padding=1)

        def fusion(ch: int, level: int) -> nn.Module | None:
            if not (with_conditioning and attention_levels[level]):
                return None
            return build_fusion(fusion_mode, ch, context_dim, num_heads=max(ch // num_head_channels, 1),
                                norm_num_groups=norm_num_groups)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.down.append(_Level(channels[max(i - 1, 0)], ch, temb, num_res_blocks, norm_num_groups, fusion(ch, i),
                                    use_checkpointing))
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv3d(ch, ch, kernel_size=3, stride=2, padding=1))
        bottom = channels[-1]
        self.mid_block1 = DiffusionUNetResnetBlock(3, bottom, temb, bottom, norm_num_groups=norm_num_groups)
        # use_flash_attention selects torch's scaled_dot_product_attention (memory-efficient kernels on GPU)
        self.mid_attention = (
            _SpatialSelfAttention(
                3, bottom, num_head_channels=num_head_channels, norm_num_groups=norm_num_groups,
                use_flash_attention=True,
            )
            if bottleneck_attention
            else nn.Identity()
        )
        self.mid_block2 = DiffusionUNetResnetBlock(3, bottom, temb, bottom, norm_num_groups=norm_num_groups)
        self.up = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):
            ch, coarse = channels[i], channels[i + 1]
            self.upsample.append(nn.Conv3d(coarse, ch, kernel_size=3, padding=1))
            self.gates.append(AttentionGate(ch, ch, max(ch // 2, 1)))
            self.up.append(_Level(2 * ch, ch, temb, num_res_blocks, norm_num_groups, fusion(ch, i), use_checkpointing))
        self.out = nn.Sequential(
            nn.GroupNorm(norm_num_groups, channels[0]), nn.SiLU(), nn.Conv3d(channels[0], out_channels, 3, padding=1)
        )
        if residual_output:
            # Start from the identity prediction x0 = y0, which training then has to beat.
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)
        if pass_through is not None and (pass_through.ndim != 2 or pass_through.shape[1] != 3):
            raise ValueError(f"pass_through must be a (T, 3) table, got shape {tuple(pass_through.shape)}.")
        # empty when off (TorchScript needs one type for the attribute) and then not in the state dict,
        # so weights trained without it load as before
        table = torch.zeros(0, 3) if pass_through is None else pass_through.float().clone()
        self.register_buffer("pass_through", table, persistent=pass_through is not None)
        self.static_out = None
        if interval_scaling:
            self.static_out = nn.Conv3d(channels[0], out_channels, 3, padding=1)
            nn.init.zeros_(self.static_out.weight)
            nn.init.zeros_(self.static_out.bias)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
        weeks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.denoise(x, timesteps, context, weeks)

    def denoise(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None, weeks: torch.Tensor | None
    ) -> torch.Tensor:
        """The denoiser's output for ``[x_t, y0]`` at ``timesteps`` (arguments as in the class docstring).

        Subclasses that change ``forward`` call this, as TorchScript compiles no ``super()``.
        """
        factor = 2 ** (len(self.channels) - 1)
        if any([s % factor != 0 for s in x.shape[2:]]):
            raise ValueError(f"spatial size {list(x.shape[2:])} must be divisible by {factor}.")
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(get_timestep_embedding(timesteps, self.channels[0]).to(x.dtype))
        interval: torch.Tensor | None = None
        if self.interval_embed is not None or self.static_out is not None:
            if weeks is None:
                weeks = torch.full((1,), self.default_weeks, device=x.device)
            # the interval in units of DEFAULT_WEEKS, one per case
            interval = weeks.to(device=x.device, dtype=emb.dtype).reshape(-1, 1).expand(x.shape[0], 1)
            interval = interval / self.default_weeks
        if self.interval_embed is not None and interval is not None:
            emb = emb + self.interval_embed(interval - 1.0)
        h = self.stem(x)
        skips = []
        # zip stops at the last level, which has no downsampling (TorchScript indexes module lists by literals only)
        for level, downsample in zip(self.down, self.downsample):
            h = level(h, emb, context)
            skips.append(h)
            h = downsample(h)
        h = self.down[-1](h, emb, context)
        h = self.mid_block1(h, emb)
        h = self.mid_attention(h)
        h = self.mid_block2(h, emb)
        for upsample, gate, level in zip(self.upsample, self.gates, self.up):
            skip = skips.pop()
            h = upsample(F.interpolate(h, size=skip.shape[2:], mode="nearest"))
            h = level(torch.cat([gate(skip, h), h], dim=1), emb, context)
        out = self.out(h)
        if self.static_out is not None and interval is not None:
            out = self.static_out(h) + interval.reshape(-1, 1, 1, 1, 1).to(out.dtype) * out
        if self.residual_output:
            out = out + x[:, 1:2]
        if self.pass_through.shape[0] > 0:
            coef = self.pass_through[timesteps.long()].to(out.dtype).reshape(-1, 3, 1, 1, 1)
            out = coef[:, 0:1] * x[:, 0:1] + coef[:, 1:2] * x[:, 1:2] + coef[:, 2:3] * out
        return out


def mean_prediction_input(y0: torch.Tensor, timestep: int, input_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's input and timesteps for the mean prediction f(x_T = y0, y0, T) of residual shift.

    x_T ~ N(x0 + eta_T e0, kappa^2 eta_T I) (ResShift Eq. 2) has mean y0 - (1 - eta_T) e0 ~ y0, so
    the network sees x_T = y0 scaled as the scheduler scales x_t at T, beside y0 itself
    (``ResidualShiftInferer.predict_mean`` explains why this is the conditional mean).

    Args:
        y0: initial scans, (B, 1, D, H, W).
        timestep: the step index of t = T, ``num_train_timesteps - 1``.
        input_scale: the factor ``scale_model_input`` applies to x_t at that step.

    Returns:
        ``[input_scale * y0, y0]`` (B, 2, D, H, W) and the timesteps (B,).
    """
    timesteps = torch.full((y0.shape[0],), timestep, dtype=torch.long, device=y0.device)
    return torch.cat([y0 * input_scale, y0], dim=1), timesteps


class MeanPredictionUNet(AttentionDiffusionUNet):
    """The denoiser as an image-to-image network: the initial scan in, its mean-prediction follow-up out.

    ``forward(y0)`` or ``forward(y0, context=context, weeks=weeks)`` with y0 (B, 1, D, H, W) returns
    the mean prediction (B, 1, D, H, W), the input of ``mean_prediction_input``: what MONAI's
    ``verify_net_in_out``, ``SlidingWindowInferer`` and ``ckpt_export`` expect of a bundle's
    ``network_def``. ``forward(x, timesteps, context, weeks)`` is the denoiser itself, as the
    diffusion sampler calls it. The step and the scale are plain numbers, not the scheduler module, so the
    parameters and the state dict are exactly the denoiser's: its weights load without renaming.

    Args:
        mean_timestep: the step index of t = T, ``num_train_timesteps - 1`` of the scheduler.
        mean_input_scale: the scheduler's input scale of x_t at that step (1.0 if it does not scale).
        kwargs: see ``AttentionDiffusionUNet``.
    """

    def __init__(self, mean_timestep: int, mean_input_scale: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mean_timestep = int(mean_timestep)
        self.mean_input_scale = float(mean_input_scale)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | None = None, context: torch.Tensor | None = None,
        weeks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if timesteps is None:
            x, timesteps = mean_prediction_input(x, self.mean_timestep, self.mean_input_scale)
        return self.denoise(x, timesteps, context, weeks)
