"""Residual-shift diffusion (ResShift, Yue et al., NeurIPS 2023; CIResDiff Sec. 2.2).

With y0 the initial scan, x0 the follow-up and e0 = y0 - x0 their residual, one forward step
moves the sample a little towards y0 and adds noise (ResShift Eq. 1):

    q(x_t | x_{t-1}, y0) = N(x_t; x_{t-1} + alpha_t e0, kappa^2 alpha_t I),   alpha_t = eta_t - eta_{t-1},

so the marginal is (ResShift Eq. 2, CIResDiff Eq. 2)

    q(x_t | x0, y0) = N(x_t; x0 + eta_t e0, kappa^2 eta_t I),   t = 1..T,

with eta increasing from eta_1 ~ 0 to eta_T ~ 1: x_T is y0 plus Gaussian noise and sampling starts
from the initial scan. The reverse step is the Bayes posterior (ResShift Eq. 3, CIResDiff Eq. 3)
with x0 replaced by the network's prediction:

    q(x_{t-1} | x_t, x0, y0) = N(eta_{t-1}/eta_t x_t + alpha_t/eta_t x0, kappa^2 eta_{t-1}/eta_t alpha_t I).

Indexing: the papers count t = 1..T; in code timesteps are 0-indexed, index i holds eta_{i+1}.
Index 0 is therefore the last reverse step; there eta_{t-1} = eta_0 = 0, so its posterior has
zero variance and returns the predicted x0.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def residual_shift_etas(
    num_train_timesteps: int, kappa: float, min_noise_level: float, etas_end: float, power: float
) -> torch.Tensor:
    """The eta schedule of ResShift (Sec. 3.2, noise schedule), in float64, 0-indexed.

    sqrt(eta_t) = sqrt(eta_1) * b0 ** beta_t, with beta_t = ((t - 1) / (T - 1)) ** p * (T - 1) and
    b0 = exp(log(eta_T / eta_1) / (2 (T - 1))): sqrt(eta) is geometric in the warped step beta_t,
    from sqrt(eta_1) at t = 1 to sqrt(eta_T) at t = T. eta_1 = min((min_noise_level / kappa) ** 2,
    0.001) makes the noise standard deviation of the first step kappa sqrt(eta_1) at most
    min_noise_level, and caps eta_1 so that the first step keeps x0 almost unshifted.

    Args:
        num_train_timesteps: T.
        kappa: noise scale kappa.
        min_noise_level: noise standard deviation wanted at t = 1 (before the 0.001 cap of eta_1).
        etas_end: eta_T.
        power: warping power p (p < 1 spends more steps near t = 1, where the image is almost clean).

    Returns:
        (T,) tensor whose entry i is eta_{i + 1}.
    """
    if num_train_timesteps < 2:
        raise ValueError(f"the residual-shift schedule needs at least 2 steps, got {num_train_timesteps}.")
    if not 0 < etas_end <= 1:
        raise ValueError(f"etas_end must be in (0, 1], got {etas_end}.")
    if kappa <= 0 or min_noise_level <= 0 or power <= 0:
        raise ValueError("kappa, min_noise_level and power must be positive.")
    eta_1 = min((min_noise_level / kappa) ** 2, 0.001)
    t_max = num_train_timesteps - 1
    b0 = math.exp(math.log(etas_end / eta_1) / (2 * t_max))
    beta = (torch.arange(num_train_timesteps, dtype=torch.float64) / t_max) ** power * t_max
    return (math.sqrt(eta_1) * b0**beta) ** 2


class ResidualShiftScheduler(nn.Module):
    """Forward process, posterior step and prior of residual-shift diffusion; owns its buffers.

    Offers the protocol of MONAI's ``monai.networks.schedulers.Scheduler`` (an ``nn.Module`` whose
    buffers follow ``.to(device)``; ``set_timesteps``, ``timesteps``, ``step``), so that one sampling
    loop serves it and MONAI's DDPM; the forward process ``add_noise`` and the prior take y0 as an
    extra argument. MONAI's base class is built around a beta schedule shrinking x0 towards zero,
    which cannot express a shift of x0 towards y0. Every coefficient is computed in float64 and
    stored in float32.

    Args:
        num_train_timesteps: number of diffusion steps T (CIResDiff uses 15); all T are used for sampling.
        kappa: noise scale. ResShift's 2.0 was chosen for latents in [-1, 1]; on CT in [0, 1] its noise
            (SD >= 0.235 on 14 of 15 steps) drowns the residual y0 - x0 (RMS ~0.15), so the default is
            0.1, the value of CIResDiff's released code (docs/README.md, "Choosing kappa", has the
            validation sweep). This default is the one place the value lives: every config builds the
            scheduler with it, and ``scheduler#kappa`` overrides it for a sweep.
        min_noise_level: noise standard deviation at the first step before the cap (ResShift: 0.04).
        etas_end: eta_T (ResShift: 0.99).
        power: schedule warping p (ResShift: 0.3).
        scale_input: divide the network input x_t by sqrt(kappa^2 eta_t + 1), as ResShift does, so
            that its spread stays close to that of the images at every step.
    """

    def __init__(
        self,
        num_train_timesteps: int = 15,
        kappa: float = 0.1,
        min_noise_level: float = 0.04,
        etas_end: float = 0.99,
        power: float = 0.3,
        scale_input: bool = True,
    ) -> None:
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.kappa = kappa
        self.scale_input = scale_input
        etas = residual_shift_etas(num_train_timesteps, kappa, min_noise_level, etas_end, power)
        etas_prev = torch.cat([torch.zeros(1, dtype=torch.float64), etas[:-1]])
        alphas = etas - etas_prev
        self.register_buffer("etas", etas.float())
        self.register_buffer("sqrt_etas", etas.sqrt().float())
        self.register_buffer("input_scale", (kappa**2 * etas + 1.0).rsqrt().float())
        self.register_buffer("posterior_coef_xt", (etas_prev / etas).float())
        self.register_buffer("posterior_coef_x0", (alphas / etas).float())
        self.register_buffer("posterior_variance", (kappa**2 * etas_prev / etas * alphas).float())
        # reverse order of the sampling loop: T-1, ..., 0
        self.register_buffer("timesteps", torch.arange(num_train_timesteps - 1, -1, -1))

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """The reverse steps of sampling, T-1 down to 0, in ``timesteps`` (MONAI's scheduler protocol).

        The posterior (ResShift Eq. 3) is defined between consecutive steps of the training
        schedule, so sampling takes all T of them (ResShift and CIResDiff sample with T = 15).

        Args:
            num_inference_steps: must be T (or ``None``).
            device: device of ``timesteps``.
        """
        if num_inference_steps not in (None, self.num_train_timesteps):
            raise ValueError(
                f"residual-shift sampling takes all {self.num_train_timesteps} training steps, "
                f"got num_inference_steps={num_inference_steps}."
            )
        if device is not None:
            self.timesteps = self.timesteps.to(device)

    @staticmethod
    def _per_sample(values: torch.Tensor, timesteps: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``values[timesteps]`` shaped (B, 1, ..., 1) (or (1, ..., 1) for one step) to broadcast against ``like``."""
        index = torch.as_tensor(timesteps, device=values.device).long().reshape(-1)
        return values[index].to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(
        self, x0: torch.Tensor, y0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0, y0) = N(x0 + eta_t (y0 - x0), kappa^2 eta_t I) (ResShift Eq. 2).

        Args:
            x0: the follow-up, (B, C, ...).
            y0: the initial scan, same shape.
            noise: standard normal noise, same shape.
            timesteps: (B,) step indices in [0, T).
        """
        eta = self._per_sample(self.etas, timesteps, x0)
        sqrt_eta = self._per_sample(self.sqrt_etas, timesteps, x0)
        return x0 + eta * (y0 - x0) + self.kappa * sqrt_eta * noise

    def scale_model_input(self, sample: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """The network input for x_t: x_t / sqrt(kappa^2 eta_t + 1) when ``scale_input`` is on, else x_t.

        Args:
            sample: x_t, (B, C, ...).
            timesteps: (B,) step indices, or one index for the whole batch.
        """
        if not self.scale_input:
            return sample
        return sample * self._per_sample(self.input_scale, timesteps, sample)

    def prior_sample(self, y0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_T = y0 + kappa sqrt(eta_T) noise, a sample of q(x_T | x0, y0) with eta_T ~ 1 (ResShift Eq. 2 at t = T).

        Args:
            y0: the initial scan.
            noise: standard normal noise of the same shape.
        """
        return y0 + self.kappa * self.sqrt_etas[-1].to(y0) * noise

    def pass_through_coefficients(self, change_sd: float) -> torch.Tensor:
        """Per-step coefficients that let the denoiser pass a nearly clean x_t through (the network's ``pass_through``).

        Rearranging ResShift Eq. 2, x_hat_t = (x_t - eta_t y0) / (1 - eta_t) is an unbiased estimate
        of x0 with noise of SD sigma_t = kappa sqrt(eta_t) / (1 - eta_t): almost x0 itself at t = 1,
        useless at t = T. As EDM preconditions its denoiser (Karras et al., NeurIPS 2022, Eq. 7 and
        Table 1: c_skip, c_out), with the initial scan as the prior mean and ``change_sd`` as the
        data's spread around it:

            x0_pred = c_t x_hat_t + (1 - c_t) y0 + k_t (f - y0),
            c_t = s_d^2 / (s_d^2 + sigma_t^2),   k_t = sigma_t / sqrt(sigma_t^2 + s_d^2),

        where f is the network's output (y0 plus its change, ``residual_output``). At t = T, c_t ~ 0 and
        k_t ~ 1: x0_pred = f, the mean prediction is the network's. At t = 1, c_t ~ 1 and k_t ~
        sigma_t / s_d: x_t passes through and the network only corrects x_hat_t's noise, on a target
        of unit scale. Without it a network that always outputs y0 plus a change re-applies the
        change to an x_t that already holds it, and the chain drifts (docs/README.md, "Why the chain
        drifted", which also measures this remedy: it is off because it has not yet made the
        samples better).

        Args:
            change_sd: s_d, the RMS of x0 - y0 (identity's error) in image units.

        Returns:
            (T, 3) float32 (a_t, b_t, k_t): x0_pred = a_t x_in + b_t y0 + k_t f for the network's
            input x_in = ``scale_model_input(x_t, t)``.
        """
        if change_sd <= 0:
            raise ValueError(f"change_sd must be positive, got {change_sd}.")
        etas = self.etas.double()
        scale = self.input_scale.double() if self.scale_input else torch.ones_like(etas)
        # c_t / (1 - eta_t) and k_t multiplied through by 1 - eta_t, which is 0 for etas_end = 1
        denominator = change_sd**2 * (1.0 - etas) ** 2 + self.kappa**2 * etas
        skip_over_rest = change_sd**2 * (1.0 - etas) / denominator
        out = (self.kappa**2 * etas / denominator).sqrt()
        return torch.stack([skip_over_rest / scale, 1.0 - skip_over_rest - out, out], dim=1).float()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step: x_{t-1} from the posterior (ResShift Eq. 3) with x0 predicted by the network.

        Mean eta_{t-1}/eta_t x_t + alpha_t/eta_t x0_pred, variance kappa^2 eta_{t-1}/eta_t alpha_t;
        the last step (index 0) draws no noise and returns x0_pred itself.

        Args:
            model_output: the network's prediction of x0.
            timestep: current step index t in [0, T) (0-indexed, see the module docstring).
            sample: x_t.
            generator: random generator for the posterior noise; noise is drawn on its device.

        Returns:
            x_{t-1} and the predicted x0, as MONAI's schedulers return (prev_sample, pred_original_sample).
        """
        timestep = int(timestep)
        if not 0 <= timestep < self.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {self.num_train_timesteps}), got {timestep}.")
        if timestep == 0:
            return model_output, model_output
        mean = self.posterior_coef_xt[timestep] * sample + self.posterior_coef_x0[timestep] * model_output
        noise_device = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, device=noise_device, dtype=sample.dtype)
        return mean + self.posterior_variance[timestep].sqrt() * noise.to(sample.device), model_output
