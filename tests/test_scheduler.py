"""ResidualShiftScheduler: the eta schedule, the forward process, the posterior step and the prior."""

from __future__ import annotations

import math

import pytest
import torch

from custom.scheduler import ResidualShiftScheduler, residual_shift_etas


@pytest.mark.parametrize("kappa, eta_1", [(2.0, (0.04 / 2.0) ** 2), (0.1, 0.001)])
def test_schedule_matches_its_closed_form(kappa, eta_1):
    T, p, eta_T = 15, 0.3, 0.99
    etas = ResidualShiftScheduler(num_train_timesteps=T, kappa=kappa).etas.double()
    assert etas.shape == (T,)
    # 0.04 / 2.0 gives eta_1 = 4e-4; 0.04 / 0.1 would give 0.16 and is capped at 0.001
    assert math.isclose(etas[0].item(), eta_1, rel_tol=1e-6)
    assert math.isclose(etas[-1].item(), eta_T, rel_tol=1e-6)
    assert torch.all(etas[1:] > etas[:-1])
    # ResShift's closed form, written with the paper's 1-indexed t
    b0 = math.exp(math.log(eta_T / eta_1) / (2 * (T - 1)))
    expected = [(math.sqrt(eta_1) * b0 ** (((t - 1) / (T - 1)) ** p * (T - 1))) ** 2 for t in range(1, T + 1)]
    assert torch.allclose(etas, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    assert torch.equal(ResidualShiftScheduler(num_train_timesteps=T).timesteps, torch.arange(T - 1, -1, -1))


def test_schedule_rejects_invalid_settings():
    with pytest.raises(ValueError, match="at least 2"):
        residual_shift_etas(1, 2.0, 0.04, 0.99, 0.3)
    with pytest.raises(ValueError, match="etas_end"):
        residual_shift_etas(15, 2.0, 0.04, 1.5, 0.3)


@pytest.mark.parametrize("kappa", [2.0, 0.1])
def test_add_noise_has_the_stated_mean_and_variance(kappa):
    s = ResidualShiftScheduler(kappa=kappa)
    g = torch.Generator().manual_seed(0)
    n = 40000
    x0 = torch.full((n, 1, 1), 0.2)
    y0 = torch.full((n, 1, 1), 0.7)
    for t in (0, 6, 14):
        x_t = s.add_noise(x0, y0, torch.randn(x0.shape, generator=g), torch.full((n,), t))
        eta = s.etas[t].item()
        std = kappa * math.sqrt(eta)
        assert abs(x_t.mean().item() - (0.2 + eta * 0.5)) < 5 * std / math.sqrt(n) + 1e-6
        assert abs(x_t.var().item() / std**2 - 1) < 0.05
    # one step per batch element
    t = torch.tensor([0, 14])
    x_t = s.add_noise(torch.zeros(2, 1, 4), torch.ones(2, 1, 4), torch.zeros(2, 1, 4), t)
    assert torch.allclose(x_t[:, 0, 0], s.etas[t])


def _bayes_posterior(x_t, x0, y0, eta_prev, eta_t, kappa):
    """q(x_{t-1} | x_t, x0, y0) from the Gaussian product of q(x_{t-1} | x0, y0) and q(x_t | x_{t-1}, y0)."""
    e0 = y0 - x0
    alpha = eta_t - eta_prev
    prior_mean, prior_var = x0 + eta_prev * e0, kappa**2 * eta_prev
    # q(x_t | x_{t-1}) = N(x_{t-1} + alpha e0, kappa^2 alpha): as a function of x_{t-1}, mean x_t - alpha e0
    lik_mean, lik_var = x_t - alpha * e0, kappa**2 * alpha
    var = 1 / (1 / prior_var + 1 / lik_var)
    return var * (prior_mean / prior_var + lik_mean / lik_var), var


@pytest.mark.parametrize("kappa", [2.0, 0.1])
def test_step_is_the_bayes_posterior_of_the_forward_process(kappa):
    s = ResidualShiftScheduler(kappa=kappa)
    g = torch.Generator().manual_seed(1)
    x0, y0, x_t = (torch.randn(2, 1, 8, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    etas = residual_shift_etas(15, kappa, 0.04, 0.99, 0.3)
    for t in range(1, 15):
        mean, var = _bayes_posterior(x_t, x0, y0, etas[t - 1], etas[t], kappa)
        prev, x0_pred = s.step(x0.float(), t, x_t.float(), generator=torch.Generator().manual_seed(t))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        assert torch.allclose(prev.double(), mean + var.sqrt() * noise, atol=1e-5, rtol=1e-5)
        assert torch.equal(x0_pred, x0.float())
    # the last step (t = 1 in the paper, index 0 here) is noise-free and returns the prediction
    prev, x0_pred = s.step(x0.float(), 0, x_t.float(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(prev, x0.float()) and torch.equal(x0_pred, x0.float())
    with pytest.raises(ValueError, match="timestep"):
        s.step(x0.float(), 15, x_t.float())


def test_step_samples_have_the_posterior_spread():
    s = ResidualShiftScheduler(kappa=2.0)
    x_t, x0 = torch.zeros(50000), torch.ones(50000)
    prev, _ = s.step(x0, 7, x_t, torch.Generator().manual_seed(2))
    eta_t, eta_prev = s.etas[7].item(), s.etas[6].item()
    assert abs(prev.mean().item() - (eta_t - eta_prev) / eta_t) < 0.02
    assert abs(prev.var().item() / (4.0 * eta_prev / eta_t * (eta_t - eta_prev)) - 1) < 0.05


def test_prior_and_input_scaling():
    s = ResidualShiftScheduler(kappa=2.0)
    y0, noise = torch.rand(1, 1, 4, 4, 4), torch.randn(1, 1, 4, 4, 4)
    assert torch.allclose(s.prior_sample(y0, noise), y0 + 2.0 * math.sqrt(0.99) * noise, atol=1e-6)
    x_t = torch.randn(2, 1, 4, 4, 4)
    t = torch.tensor([3, 14])
    expected = x_t / torch.sqrt(4.0 * s.etas[t] + 1).reshape(2, 1, 1, 1, 1)
    assert torch.allclose(s.scale_model_input(x_t, t), expected)
    assert torch.allclose(s.scale_model_input(x_t[1:], 14), expected[1:])
    assert torch.equal(ResidualShiftScheduler(scale_input=False).scale_model_input(x_t, t), x_t)


def test_kappa_reaches_every_scheduler_user_from_one_config_value(bundle_root):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle_root), "use_text": False, "scheduler#kappa": 0.3})
    batch, inferer = parser.get_parsed_content("train#prepare_batch"), parser.get_parsed_content("inferer")
    assert batch.scheduler is inferer.scheduler and inferer.scheduler.kappa == 0.3
    assert float(inferer.scheduler.posterior_variance[1]) == pytest.approx(
        float(ResidualShiftScheduler(kappa=0.3).posterior_variance[1]))
    # without an override, training and inference both take the one default of the scheduler
    defaults = []
    for name in ("train", "inference"):
        parser = ConfigParser()
        parser.read_config(str(bundle_root / "configs" / f"{name}.json"))
        assert "kappa" not in parser["scheduler"]
        parser.update({"bundle_root": str(bundle_root), "use_text": False})
        defaults.append(parser.get_parsed_content("scheduler").kappa)
    assert defaults == [ResidualShiftScheduler().kappa] * 2


def test_set_timesteps_follows_monai_protocol_and_refuses_skipped_steps():
    s = ResidualShiftScheduler(num_train_timesteps=15)
    s.set_timesteps(15, device="cpu")
    assert s.timesteps.tolist() == list(range(14, -1, -1))
    s.set_timesteps()
    assert len(s.timesteps) == 15
    with pytest.raises(ValueError, match="all 15 training steps"):
        s.set_timesteps(5)


def test_pass_through_coefficients_are_edms_skip_and_output_weights_for_the_residual_shift_marginal():
    s = ResidualShiftScheduler()
    table = s.pass_through_coefficients(0.09)
    assert table.shape == (s.num_train_timesteps, 3)
    g = torch.Generator().manual_seed(0)
    x0, y0, f = (torch.rand(2, 1, 4, 4, 4, generator=g) for _ in range(3))
    etas = s.etas.double()
    sigma = s.kappa * etas.sqrt() / (1 - etas)
    skip, out = 0.09**2 / (0.09**2 + sigma**2), sigma / (sigma**2 + 0.09**2).sqrt()
    for t in range(s.num_train_timesteps):
        x_in = s.scale_model_input(s.add_noise(x0, y0, torch.zeros_like(x0), torch.tensor([t, t])), t)
        a, b, k = table[t].tolist()
        # without noise x_hat = x0: x0_pred = c x0 + (1 - c) y0 + k (f - y0)
        expected = float(skip[t]) * x0 + (1 - float(skip[t])) * y0 + float(out[t]) * (f - y0)
        assert torch.allclose(a * x_in + b * y0 + k * f, expected, atol=1e-5)
        assert k == pytest.approx(float(out[t]), rel=1e-5)
    # t = T: the network's output alone (the mean prediction unchanged); t = 1: x_t with a small correction
    assert float(table[-1, 2]) > 0.9999 and float(table[-1, 0]) < 0.01
    assert float(table[0, 0]) > 0.999 and float(table[0, 2]) < 0.05
    assert bool((table[1:, 2] > table[:-1, 2]).all())


def test_pass_through_coefficients_refuse_a_bad_spread_and_stay_finite_at_eta_one():
    with pytest.raises(ValueError, match="change_sd"):
        ResidualShiftScheduler().pass_through_coefficients(0.0)
    a, b, k = ResidualShiftScheduler(etas_end=1.0).pass_through_coefficients(0.09)[-1].tolist()
    assert abs(a) < 1e-6 and abs(b) < 1e-6 and k == pytest.approx(1.0)
