"""Whole-volume diffusion sampling with sliding windows (CIResDiff Sec. 2.2 and 3.1).

Every reverse step runs the denoiser over the *whole* volume with MONAI's
``SlidingWindowInferer`` (overlapping windows blended with a Gaussian importance map) and only
then updates the volume, so neighbouring windows never disagree about the sample they share:
there is one x_t per step, not one per patch.

- ``ResidualShiftInferer``: starts from the initial scan (x_T = y0 + kappa sqrt(eta_T) noise) and
  takes T (15) posterior steps with the network predicting x0 (the full model, DM-R / DM-R-CIP).
- ``ConditionalDDPMInferer``: starts from pure noise and runs a MONAI DDPM/DDIM scheduler with the
  network predicting the noise, y0 concatenated (the paper's DM / DM-CIP baseline).

Both follow MONAI's ``Inferer`` contract: ``inferer(inputs, network)`` with the initial scan
alone returns the generated follow-up (MONAI Label calls it this way); the lung-function text
context is an optional keyword.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.networks.schedulers import Scheduler
from monai.utils import ensure_tuple_rep
from tqdm.auto import tqdm

from custom.scheduler import ResidualShiftScheduler

TextEncoder = Callable[[Sequence[str]], torch.Tensor]


class _StepNetwork:
    """The denoiser at one reverse step: adds the step's timestep and context to each window batch."""

    def __init__(self, network: Callable, timestep: int, context: torch.Tensor | None) -> None:
        self.network = network
        self.timestep = timestep
        self.context = context

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        n = windows.shape[0]
        timesteps = torch.full((n,), self.timestep, device=windows.device, dtype=torch.long)
        context = None if self.context is None else self.context.expand(n, *self.context.shape[1:])
        return self.network(windows, timesteps, context)


class DiffusionSamplingInferer(Inferer):
    """Shared machinery: sliding windows over the whole volume at every step, samples, uncertainty.

    Args:
        roi_size: window size (the training patch size).
        sw_batch_size: windows per network call.
        overlap: fraction of overlap between neighbouring windows.
        mode: blending of overlapping windows, ``"gaussian"`` or ``"constant"``.
        sigma_scale: standard deviation of the Gaussian importance map relative to the window.
        num_samples: samples drawn per case; with more than one, their mean is the prediction.
        return_uncertainty: return ``[mean, std]`` as two channels instead of the mean alone.
        text_encoder: maps texts to context features; used when no context is given.
        default_text: text encoded when no context is given (the "not measured" record).
        progress: show a progress bar over the reverse steps.
        seed: seed of the sampling noise (``None`` uses the global random state).
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int = 96,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        mode: str = "gaussian",
        sigma_scale: float = 0.125,
        num_samples: int = 1,
        return_uncertainty: bool = False,
        text_encoder: TextEncoder | None = None,
        default_text: str | None = None,
        progress: bool = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError("num_samples must be at least 1")
        self.window = SlidingWindowInferer(
            roi_size=ensure_tuple_rep(roi_size, 3), sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, sigma_scale=sigma_scale,
            cache_roi_weight_map=True, progress=False,
        )
        self.num_samples = num_samples
        self.return_uncertainty = return_uncertainty
        self.text_encoder = text_encoder
        self.default_text = default_text
        self.progress = progress
        self.seed = seed

    def denoise(self, network: Callable, x_t: torch.Tensor, y0: torch.Tensor, timestep: int, context: torch.Tensor | None) -> torch.Tensor:
        """The network's output over the whole volume at one step, from the window blend."""
        return self.window(torch.cat([x_t, y0], dim=1), _StepNetwork(network, timestep, context))

    def sample_one(self, network: Callable, y0: torch.Tensor, context: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """One sample of the follow-up for one case (1, C, ...); implemented by the subclasses."""
        raise NotImplementedError

    def _context(self, batch_size: int, device: torch.device, context: torch.Tensor | None) -> torch.Tensor | None:
        if context is not None or self.text_encoder is None:
            return context
        if self.default_text is None:
            raise ValueError("a text encoder was given without default_text for calls without a lung-function record")
        return self.text_encoder([self.default_text]).to(device).expand(batch_size, -1, -1)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor, network: Callable, context: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        """Generate the follow-up of every case in ``inputs`` (the initial scans, (B, 1, D, H, W)).

        Args:
            inputs: initial scans y0.
            network: the denoiser.
            context: text token features (B, L, D) or ``None``.
            args: unused, for the ``Inferer`` signature.
            kwargs: unused, for the ``Inferer`` signature.
        """
        y0 = torch.as_tensor(inputs)
        context = self._context(y0.shape[0], y0.device, context)
        generator = self._generator(y0.device)
        outputs = []
        for b in range(y0.shape[0]):
            ctx = None if context is None else context[b : b + 1]
            samples = torch.stack([self.sample_one(network, y0[b : b + 1], ctx, generator) for _ in range(self.num_samples)])
            mean = samples.mean(0)
            if self.return_uncertainty:
                std = samples.std(0, unbiased=False)
                mean = torch.cat([mean, std], dim=1)
            outputs.append(mean)
        return torch.cat(outputs, dim=0)

    def _steps(self, steps: Sequence[int]):
        return tqdm(steps, desc="reverse diffusion", leave=False) if self.progress else steps


class ResidualShiftInferer(DiffusionSamplingInferer):
    """Residual-shift sampling from the initial scan over the whole volume (CIResDiff, ResShift).

    Args:
        scheduler: the ``ResidualShiftScheduler`` the network was trained with.
        kwargs: see ``DiffusionSamplingInferer``.
    """

    def __init__(self, scheduler: ResidualShiftScheduler, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scheduler = scheduler

    def sample_one(self, network: Callable, y0: torch.Tensor, context: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        scheduler = self.scheduler.to(y0.device)
        noise_device = generator.device if generator is not None else y0.device
        x_t = scheduler.prior_sample(y0, torch.randn(y0.shape, generator=generator, device=noise_device).to(y0))
        for t in self._steps(scheduler.timesteps.tolist()):
            x0_pred = self.denoise(network, scheduler.scale_model_input(x_t, t), y0, t, context)
            x_t, _ = scheduler.step(x0_pred, t, x_t, generator)
        return x_t


class ConditionalDDPMInferer(DiffusionSamplingInferer):
    """Conditional DDPM/DDIM sampling from pure noise with y0 concatenated (the paper's DM baseline).

    Args:
        scheduler: a MONAI ``DDPMScheduler`` or ``DDIMScheduler`` sharing the training noise schedule.
        num_inference_steps: reverse steps (e.g. 1000 for DDPM, 50 for DDIM).
        kwargs: see ``DiffusionSamplingInferer``.
    """

    def __init__(self, scheduler: Scheduler, num_inference_steps: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps or scheduler.num_train_timesteps

    def sample_one(self, network: Callable, y0: torch.Tensor, context: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        self.scheduler.set_timesteps(self.num_inference_steps, device=y0.device)
        noise_device = generator.device if generator is not None else y0.device
        x_t = torch.randn(y0.shape, generator=generator, device=noise_device).to(y0)
        for t in self._steps(self.scheduler.timesteps.tolist()):
            eps = self.denoise(network, x_t, y0, int(t), context)
            x_t, _ = self.scheduler.step(eps, int(t), x_t, generator=generator)
        return x_t
