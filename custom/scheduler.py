"""Residual-shift diffusion schedule (ResShift, Yue et al., NeurIPS 2023; CIResDiff Sec. 2.2).

With y0 the initial scan, x0 the follow-up and e0 = y0 - x0 their residual, the forward process
shifts x0 towards y0 while adding noise (CIResDiff Eq. 2, ResShift Eq. 4):

    q(x_t | x0, y0) = N(x_t; x0 + eta_t e0, kappa^2 eta_t I),   t = 1..T,

with eta increasing from eta_1 ~ 0 to eta_T ~ 1, so x_T is y0 plus Gaussian noise and sampling
starts from the initial scan. The reverse step is the Bayes posterior (CIResDiff Eq. 3,
ResShift Eq. 7) with x0 replaced by the network's prediction:

    q(x_{t-1} | x_t, x0) = N(eta_{t-1}/eta_t x_t + alpha_t/eta_t x0, kappa^2 eta_{t-1}/eta_t alpha_t I),
    alpha_t = eta_t - eta_{t-1}.

In code, timesteps are 0-indexed: index i holds eta_{i+1}, so index 0 is the last reverse step,
whose posterior has zero variance and returns the predicted x0.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def residual_shift_etas(
    num_train_timesteps: int, kappa: float, min_noise_level: float, etas_end: float, power: float
) -> torch.Tensor:
    """The eta schedule of ResShift (Sec. 3.1, "Noise schedule"), in float64.

    sqrt(eta_t) = sqrt(eta_1) * b0 ** beta_t with beta_t = ((t - 1) / (T - 1)) ** p * (T - 1) and
    b0 = exp(log(eta_T / eta_1) / (2 (T - 1))), so sqrt(eta) is geometric in the warped step
    beta_t; eta_1 = min((min_noise_level / kappa) ** 2, 0.001) keeps the first step nearly clean.

    Args:
        num_train_timesteps: T.
        kappa: noise scale kappa.
        min_noise_level: noise standard deviation wanted at t = 1 (before the 0.001 cap).
        etas_end: eta_T.
        power: warping power p (smaller spends more steps near t = 1).
    """
    if num_train_timesteps < 2:
        raise ValueError("the residual-shift schedule needs at least 2 steps")
    if not 0 < etas_end <= 1:
        raise ValueError(f"etas_end must be in (0, 1], got {etas_end}")
    eta_1 = min((min_noise_level / kappa) ** 2, 0.001)
    t_max = num_train_timesteps - 1
    b0 = math.exp(math.log(etas_end / eta_1) / (2 * t_max))
    steps = torch.arange(num_train_timesteps, dtype=torch.float64)
    beta = (steps / t_max) ** power * t_max
    return (math.sqrt(eta_1) * b0**beta) ** 2


class ResidualShiftScheduler(nn.Module):
    """Forward process, posterior step and prior of residual-shift diffusion; owns its buffers.

    Args:
        num_train_timesteps: number of diffusion steps T (CIResDiff uses 15).
        kappa: noise scale; ResShift uses 2.0, CIResDiff's released code 0.1 (see docs/benchmarks.md).
        min_noise_level: noise level at the first step before capping (ResShift: 0.04).
        etas_end: eta_T (ResShift: 0.99).
        power: schedule warping p (ResShift: 0.3).
        scale_input: divide the network input x_t by sqrt(kappa^2 eta_t + 1), as ResShift does, so
            its variance stays near that of the images at every step.
    """

    def __init__(
        self,
        num_train_timesteps: int = 15,
        kappa: float = 2.0,
        min_noise_level: float = 0.04,
        etas_end: float = 0.99,
        power: float = 0.3,
        scale_input: bool = True,
    ) -> None:
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.num_inference_steps = num_train_timesteps
        self.kappa = kappa
        self.scale_input = scale_input
        etas = residual_shift_etas(num_train_timesteps, kappa, min_noise_level, etas_end, power)
        etas_prev = torch.cat([torch.zeros(1, dtype=torch.float64), etas[:-1]])
        alphas = etas - etas_prev
        self.register_buffer("etas", etas.float())
        self.register_buffer("sqrt_etas", etas.sqrt().float())
        self.register_buffer("posterior_coef_xt", (etas_prev / etas).float())
        self.register_buffer("posterior_coef_x0", (alphas / etas).float())
        self.register_buffer("posterior_variance", (kappa**2 * etas_prev / etas * alphas).float())
        self.register_buffer("timesteps", torch.arange(num_train_timesteps - 1, -1, -1))

    @staticmethod
    def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[timesteps]`` shaped (B, 1, ..., 1) to broadcast against ``like``."""
        out = values.to(like.device)[timesteps.to(like.device).long()]
        return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def add_noise(
        self, original_samples: torch.Tensor, y0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0, y0) = N(x0 + eta_t (y0 - x0), kappa^2 eta_t I) (CIResDiff Eq. 2).

        Args:
            original_samples: x0, the follow-up, (B, C, ...).
            y0: the initial scan, same shape.
            noise: standard normal noise, same shape.
            timesteps: (B,) step indices in [0, T).
        """
        eta = self._per_sample(self.etas, timesteps, original_samples)
        sqrt_eta = self._per_sample(self.sqrt_etas, timesteps, original_samples)
        return original_samples + eta * (y0 - original_samples) + self.kappa * sqrt_eta * noise

    def scale_model_input(self, sample: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """x_t / sqrt(kappa^2 eta_t + 1) when ``scale_input`` is on, else x_t.

        Args:
            sample: x_t, (B, C, ...).
            timesteps: (B,) step indices or one index for the whole batch.
        """
        if not self.scale_input:
            return sample
        timesteps = torch.as_tensor(timesteps).reshape(-1).expand(sample.shape[0])
        eta = self._per_sample(self.etas, timesteps, sample)
        return sample / torch.sqrt(self.kappa**2 * eta + 1.0)

    def prior_sample(self, y0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_T = y0 + kappa sqrt(eta_T) noise: sampling starts from the initial scan.

        Args:
            y0: the initial scan.
            noise: standard normal noise of the same shape.
        """
        return y0 + self.kappa * self.sqrt_etas[-1].to(y0) * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step: sample x_{t-1} from the posterior with x0 predicted by the network.

        Mean eta_{t-1}/eta_t x_t + alpha_t/eta_t x0_pred and variance kappa^2 eta_{t-1}/eta_t
        alpha_t (CIResDiff Eq. 3); the last step (index 0) adds no noise and returns x0_pred.

        Args:
            model_output: the network's prediction of x0.
            timestep: current step index t in [0, T).
            sample: x_t.
            generator: random generator for the posterior noise.

        Returns:
            x_{t-1} and the predicted x0.
        """
        mean = self.posterior_coef_xt[timestep] * sample + self.posterior_coef_x0[timestep] * model_output
        if timestep == 0:
            return mean, model_output
        noise_device = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, device=noise_device, dtype=sample.dtype).to(sample.device)
        return mean + self.posterior_variance[timestep].sqrt() * noise, model_output
