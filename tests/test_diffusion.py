"""Residual-shift scheduler, whole-volume sliding-window sampling and the DDPM baseline."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from custom.engines import ConditionalDDPMPrepareBatch, ResidualShiftPrepareBatch
from custom.inferer import ConditionalDDPMInferer, ResidualShiftInferer
from custom.networks import AttentionDiffusionUNet
from custom.scheduler import ResidualShiftScheduler, residual_shift_etas


def test_schedule_matches_its_closed_form():
    etas = residual_shift_etas(15, kappa=2.0, min_noise_level=0.04, etas_end=0.99, power=0.3)
    assert len(etas) == 15
    assert math.isclose(etas[0].item(), (0.04 / 2.0) ** 2, rel_tol=1e-9)
    assert math.isclose(etas[-1].item(), 0.99, rel_tol=1e-9)
    assert torch.all(etas[1:] > etas[:-1])
    # sqrt(eta) is geometric in the warped step beta_t = (t / (T-1))^p (T-1)
    beta = (torch.arange(15, dtype=torch.float64) / 14) ** 0.3 * 14
    log_ratio = (etas.sqrt().log() - etas[0].sqrt().log()) / beta.clamp_min(1e-12)
    assert torch.allclose(log_ratio[1:], log_ratio[1:].mean().expand(14), rtol=1e-9)
    # the first eta is capped at 0.001 when min_noise_level / kappa is large
    assert math.isclose(residual_shift_etas(15, 0.1, 0.04, 0.99, 0.3)[0].item(), 0.001)


def test_add_noise_has_the_stated_mean_and_variance():
    s = ResidualShiftScheduler(kappa=1.5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 0.2)
    y0 = torch.full((20000, 1), 0.7)
    t = torch.full((20000,), 9)
    x_t = s.add_noise(x0, y0, torch.randn(x0.shape, generator=g), t)
    eta = s.etas[9].item()
    assert abs(x_t.mean().item() - (0.2 + eta * 0.5)) < 0.03
    assert abs(x_t.var().item() - 1.5**2 * eta) / (1.5**2 * eta) < 0.05


def test_step_is_the_bayes_posterior_of_the_forward_process():
    s = ResidualShiftScheduler(kappa=2.0)
    g = torch.Generator().manual_seed(1)
    x0, e0, x_t = (torch.randn(64, generator=g) for _ in range(3))
    k2 = s.kappa**2
    for t in range(1, 15):
        eta_t, eta_prev = s.etas[t].double(), s.etas[t - 1].double()
        alpha = eta_t - eta_prev
        # Gaussian product of q(x_{t-1} | x0, y0) and q(x_t | x_{t-1}, y0).
        prec = 1 / (k2 * eta_prev) + 1 / (k2 * alpha)
        mean = ((x0 + eta_prev * e0) / (k2 * eta_prev) + (x_t - alpha * e0) / (k2 * alpha)) / prec
        step_mean = s.posterior_coef_xt[t].double() * x_t.double() + s.posterior_coef_x0[t].double() * x0.double()
        assert torch.allclose(step_mean, mean.double(), atol=1e-5)
        assert math.isclose(s.posterior_variance[t].item(), (1 / prec).item(), rel_tol=1e-5)
    # empirical check of step() itself at one t
    xt = torch.zeros(50000)
    x0p = torch.ones(50000)
    samples, _ = s.step(x0p, 7, xt, torch.Generator().manual_seed(2))
    assert abs(samples.mean().item() - s.posterior_coef_x0[7].item()) < 0.02
    assert abs(samples.var().item() / s.posterior_variance[7].item() - 1) < 0.05
    last, pred = s.step(x0p, 0, xt)
    assert torch.equal(last, x0p) and torch.equal(pred, x0p)


class _ResidualOracle(torch.nn.Module):
    """Knows that x0 = y0 - 0.25: predicts the true x0 in every window from the y0 channel."""

    def forward(self, x, timesteps, context=None):
        return x[:, 1:2] - 0.25


def test_oracle_denoiser_makes_sampling_return_x0_through_sliding_windows():
    g = torch.Generator().manual_seed(3)
    y0 = torch.rand(1, 1, 24, 20, 16, generator=g)
    inferer = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=(12, 12, 8), sw_batch_size=3, overlap=0.5)
    out = inferer(y0, _ResidualOracle())
    assert out.shape == y0.shape
    assert torch.allclose(out, y0 - 0.25, atol=1e-5)


class _Pointwise(torch.nn.Module):
    """A translation-equivariant, timestep-dependent network: windows cannot change its answer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Conv3d(2, 1, 1)

    def forward(self, x, timesteps, context=None):
        return self.mix(x) * (1 + 0.05 * timesteps.float().reshape(-1, 1, 1, 1, 1))


def test_sliding_window_sampling_equals_single_window_sampling():
    y0 = torch.rand(1, 1, 32, 32, 24, generator=torch.Generator().manual_seed(4))
    net = _Pointwise()
    whole = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=(32, 32, 24), seed=5)(y0, net)
    windows = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=(16, 16, 16), overlap=0.25, seed=5)(y0, net)
    assert torch.allclose(whole, windows, atol=1e-4)


def test_several_samples_give_mean_and_uncertainty():
    y0 = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(6))
    inferer = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=16, num_samples=3, return_uncertainty=True)
    out = inferer(y0, _Pointwise())
    assert out.shape == (1, 2, 16, 16, 16)
    assert torch.all(out[:, 1] >= 0) and out[:, 1].mean() > 0


def _toy_pair(g, n):
    x0 = torch.rand(n, 1, 16, 16, 16, generator=g) * 0.2 + 0.3
    y0 = x0.clone()
    y0[:, :, 4:12, 4:12, 4:12] += 0.3  # the fixed residual the model must learn to remove
    return x0, y0


def test_trained_small_denoiser_beats_the_identity_prediction():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    scheduler = ResidualShiftScheduler(kappa=0.5)
    net = AttentionDiffusionUNet(channels=(8, 16), attention_levels=(False, False), norm_num_groups=4,
                                 num_head_channels=8, with_conditioning=False)
    prepare = ResidualShiftPrepareBatch(scheduler)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(250):
        x0, y0 = _toy_pair(g, 4)
        inputs, target, _, kwargs = prepare({"image": y0, "target": x0})
        loss = torch.nn.functional.mse_loss(net(inputs, **kwargs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x0, y0 = _toy_pair(torch.Generator().manual_seed(99), 2)
    pred = ResidualShiftInferer(scheduler, roi_size=16, seed=11)(y0, net)
    mse_model = torch.mean((pred - x0) ** 2).item()
    mse_identity = torch.mean((y0 - x0) ** 2).item()
    assert mse_model < 0.5 * mse_identity, (mse_model, mse_identity)


def test_ddpm_baseline_learns_the_noise_and_samples_the_whole_volume():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    prepare = ConditionalDDPMPrepareBatch(scheduler)
    torch.manual_seed(0)
    x0 = torch.rand(2, 1, 8, 8, 8)
    y0 = torch.rand(2, 1, 8, 8, 8)
    inputs, target, _, kwargs = prepare({"image": y0, "target": x0})
    abar = scheduler.alphas_cumprod[kwargs["timesteps"]].reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(inputs[:, :1], abar.sqrt() * x0 + (1 - abar).sqrt() * target, atol=1e-5)
    assert torch.equal(inputs[:, 1:], y0)
    ddim = ConditionalDDPMInferer(DDIMScheduler(num_train_timesteps=1000), num_inference_steps=5, roi_size=8)
    out = ddim(torch.rand(1, 1, 16, 8, 8), _Pointwise())
    assert out.shape == (1, 1, 16, 8, 8) and torch.isfinite(out).all()


def test_network_uses_context_and_gates_and_monai_label_call_works():
    net = AttentionDiffusionUNet(channels=(8, 16, 16), attention_levels=(False, True, True), norm_num_groups=4,
                                 num_head_channels=8, context_dim=12)
    assert sum(isinstance(m, torch.nn.Module) and type(m).__name__ == "AttentionGate" for m in net.modules()) == 2
    for p in net.parameters():  # leave the zero-initialised fusion outputs behind
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.rand(1, 2, 16, 16, 16)
    t = torch.tensor([4])
    a, b = net(x, t, torch.randn(1, 3, 12)), net(x, t, torch.randn(1, 3, 12))
    assert not torch.allclose(a, b)
    assert not torch.allclose(net(x, t, None), a)
    calls = []

    def encoder(texts):
        calls.append(list(texts))
        return torch.ones(len(texts), 3, 12)

    inferer = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=16, text_encoder=encoder, default_text="no record")
    out = inferer(torch.rand(1, 1, 16, 16, 16), net)
    assert out.shape == (1, 1, 16, 16, 16) and calls == [["no record"]]
    with pytest.raises(ValueError, match="divisible"):
        net(torch.rand(1, 2, 10, 16, 16), t)
