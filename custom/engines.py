"""Ignite iteration pieces: how a batch of (initial, follow-up) patches becomes a training step.

MONAI's ``SupervisedTrainer`` calls ``prepare_batch(batch)`` to get ``(inputs, targets, args,
kwargs)`` and then ``loss(inferer(inputs, network, *args, **kwargs), targets)``. The classes here
put the forward diffusion process into ``prepare_batch``, so the trainer, a ``SimpleInferer`` and
an ``MSELoss`` stay MONAI's own:

- residual shift (CIResDiff Eq. 2, ResShift): the network sees ``[x_t, y0]`` and learns x0;
- conditional DDPM (the paper's "DM" baseline): the network sees ``[x_t, y0]`` and learns the noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.networks.schedulers import Scheduler

TextEncoder = Callable[[Sequence[str]], torch.Tensor]


class ConditionalPrepareBatch(PrepareBatch):
    """Shared part of the prepare-batch classes: reading y0, x0 and the text context of a batch.

    Args:
        text_encoder: maps the batch's lung-function texts to token features (B, L, D); ``None``
            trains without clinical conditioning (the paper's DM and DM-R ablations).
        image_key: batch key of the initial scan y0.
        target_key: batch key of the follow-up scan x0.
        text_key: batch key of the lung-function texts.
    """

    def __init__(
        self,
        text_encoder: TextEncoder | None = None,
        image_key: str = "image",
        target_key: str = "target",
        text_key: str = "text",
    ) -> None:
        self.text_encoder = text_encoder
        self.image_key = image_key
        self.target_key = target_key
        self.text_key = text_key

    def images(self, batchdata: dict, device: torch.device | str | None, non_blocking: bool) -> tuple:
        y0 = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking)
        x0 = torch.as_tensor(batchdata[self.target_key]).to(device, non_blocking=non_blocking)
        return y0, x0

    def context(self, batchdata: dict, device: torch.device | str | None) -> torch.Tensor | None:
        if self.text_encoder is None:
            return None
        if self.text_key not in batchdata:
            raise KeyError(
                f"the batch has no '{self.text_key}' entry: add the lung-function text transform to the preprocessing."
            )
        return self.text_encoder(list(batchdata[self.text_key])).to(device)


class ResidualShiftPrepareBatch(ConditionalPrepareBatch):
    """Training input of the residual-shift denoiser: ``x_t ~ q(x_t | x0, y0)`` at a random step.

    Returns inputs ``[scaled x_t, y0]`` (B, 2, ...), target x0 and the kwargs ``timesteps`` and
    ``context`` for the network, so that minimising the MSE is the loss
    ``||f(x_t, y0, t, text) - x0||^2`` of CIResDiff Eq. 4.

    Args:
        scheduler: the ``ResidualShiftScheduler`` that owns the eta schedule.
        text_encoder: see ``ConditionalPrepareBatch``.
        image_key: batch key of the initial scan y0.
        target_key: batch key of the follow-up scan x0.
        text_key: batch key of the lung-function texts.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        text_encoder: TextEncoder | None = None,
        image_key: str = "image",
        target_key: str = "target",
        text_key: str = "text",
    ) -> None:
        super().__init__(text_encoder, image_key, target_key, text_key)
        self.scheduler = scheduler

    def __call__(
        self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        y0, x0 = self.images(batchdata, device, non_blocking)
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.scheduler.add_noise(x0, y0, torch.randn_like(x0), timesteps)
        inputs = torch.cat([self.scheduler.scale_model_input(x_t, timesteps), y0], dim=1)
        return inputs, x0, (), {"timesteps": timesteps, "context": self.context(batchdata, device)}


class ConditionalDDPMPrepareBatch(ConditionalPrepareBatch):
    """Training input of the conditional DDPM baseline: ``x_t`` from pure-noise diffusion of x0.

    Returns inputs ``[x_t, y0]``, the noise as target (epsilon prediction, Ho et al. 2020) and the
    kwargs ``timesteps`` and ``context``.

    Args:
        scheduler: a MONAI ``DDPMScheduler`` (or ``DDIMScheduler``) defining the forward process.
        text_encoder: see ``ConditionalPrepareBatch``.
        image_key: batch key of the initial scan y0.
        target_key: batch key of the follow-up scan x0.
        text_key: batch key of the lung-function texts.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        text_encoder: TextEncoder | None = None,
        image_key: str = "image",
        target_key: str = "target",
        text_key: str = "text",
    ) -> None:
        super().__init__(text_encoder, image_key, target_key, text_key)
        self.scheduler = scheduler

    def __call__(
        self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        y0, x0 = self.images(batchdata, device, non_blocking)
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        inputs = torch.cat([x_t, y0], dim=1)
        return inputs, noise, (), {"timesteps": timesteps, "context": self.context(batchdata, device)}


class SamplingPrepareBatch(ConditionalPrepareBatch):
    """Evaluation and inference input: y0 for the sampler, x0 as the reference when known, the text context.

    Args:
        text_encoder: see ``ConditionalPrepareBatch``.
        image_key: batch key of the initial scan y0.
        target_key: batch key of the follow-up scan x0.
        text_key: batch key of the lung-function texts.
    """

    def __call__(
        self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        y0 = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking)
        # At inference there is no follow-up to compare with.
        x0 = batchdata.get(self.target_key)
        x0 = None if x0 is None else torch.as_tensor(x0).to(device, non_blocking=non_blocking)
        return y0, x0, (), {"context": self.context(batchdata, device)}
