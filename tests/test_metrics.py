"""Region-restricted PSNR/SSIM agree with their definitions and ignore what lies outside the region."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from monai.metrics import PSNRMetric, SSIMMetric

from custom.metrics import MaskedImageMetric, masked_ensemble_crps, masked_psnr, masked_ssim


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 1, 24, 24, 24, generator=g)
    pred = target + 0.05 * torch.randn(target.shape, generator=g)
    return pred, target


def test_psnr_with_full_mask_equals_monai():
    pred, target = _pair()
    full = torch.ones_like(target)
    expected = PSNRMetric(max_val=1.0)(pred, target).flatten()
    assert torch.allclose(masked_psnr(pred, target, full), expected, atol=1e-4)


def test_psnr_ignores_errors_outside_the_mask():
    pred, target = _pair()
    mask = torch.zeros_like(target)
    mask[..., 6:18, 6:18, 6:18] = 1
    inside = masked_psnr(pred, target, mask)
    spoiled = pred.clone()
    spoiled[mask == 0] = 5.0
    assert torch.allclose(masked_psnr(spoiled, target, mask), inside)
    mse = ((pred - target)[mask > 0] ** 2).reshape(2, -1).mean(1)
    assert torch.allclose(inside, 10 * torch.log10(1 / mse), atol=1e-4)


def test_ssim_with_full_mask_equals_monai_and_is_one_for_identical_images():
    pred, target = _pair(1)
    full = torch.ones_like(target)
    expected = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=7, kernel_sigma=1.5)(pred, target).flatten()
    assert torch.allclose(masked_ssim(pred, target, full), expected, atol=1e-5)
    assert torch.allclose(masked_ssim(target, target, full), torch.ones(2), atol=1e-6)


def test_empty_mask_is_an_error():
    pred, target = _pair()
    with pytest.raises(ValueError, match="non-empty"):
        masked_psnr(pred, target, torch.zeros_like(target))


def test_ignite_metric_averages_cases_and_stores_details():
    pred, target = _pair(2)
    mask = torch.ones_like(target)
    engine = Engine(lambda e, b: b)
    metric = MaskedImageMetric(masked_psnr, output_transform=lambda o: (o["pred"], o["label"], o["mask"]), name="psnr")
    metric.attach(engine, "val_psnr")
    batches = [{"pred": list(pred[i : i + 1]), "label": list(target[i : i + 1]), "mask": list(mask[i : i + 1])}
               for i in range(2)]
    state = engine.run(batches, max_epochs=1)
    per_case = masked_psnr(pred, target, mask)
    assert math.isclose(state.metrics["val_psnr"], float(per_case.mean()), rel_tol=1e-5)
    assert torch.allclose(state.metric_details["psnr"].flatten(), per_case)


def _noisy_followup(seed: int = 3):
    """A smooth follow-up, an initial scan and a prediction that both carry independent voxel noise."""
    from custom.geometry import gaussian_smooth

    g = torch.Generator().manual_seed(seed)
    target = gaussian_smooth(torch.rand(1, 24, 24, 24, generator=g), 3.0) * 4 - 1.5
    initial = target + 0.08 * torch.randn(target.shape, generator=g)
    pred = target + 0.05 * torch.randn(target.shape, generator=g)
    lungs = torch.zeros_like(target)
    lungs[:, 4:20, 4:20, 4:20] = 1
    return pred, target, lungs, initial


def _run_smoothed_gain(metric, cases):
    engine = Engine(lambda e, b: b)
    metric.attach(engine, "gain")
    batches = [{"pred": [p], "label": [t], "lungs": [m], "image": [i]} for p, t, m, i in cases]
    return engine.run(batches, max_epochs=1).metrics


def test_smoothed_gain_picks_the_sigma_that_removes_the_predictions_noise():
    from custom.geometry import gaussian_smooth
    from custom.metrics import SmoothedGainMetric, lung_psnr_gain

    cases = [_noisy_followup(3), _noisy_followup(4)]
    metric = SmoothedGainMetric([0.0, 0.5, 1.0], output_transform=lambda o: (o["pred"], o["label"], o["lungs"],
                                                                            o["image"]), sigma_name="sigma")
    metrics = _run_smoothed_gain(metric, cases)
    expected = [float(torch.stack([lung_psnr_gain(gaussian_smooth(p, s), t, m, i) for p, t, m, i in cases]).mean())
                for s in (0.0, 0.5, 1.0)]
    assert torch.allclose(metric.gains(), torch.tensor(expected), atol=1e-4)
    # white noise on a smooth image: the filter helps, so the chosen sigma is not 0 and scores its gain
    assert metrics["sigma"] > 0 and expected[0] < max(expected)
    assert metrics["gain"] == pytest.approx(max(expected), abs=1e-4)
    assert metrics["sigma"] == (0.0, 0.5, 1.0)[expected.index(max(expected))]


def test_smoothed_gain_keeps_an_exact_prediction_unsmoothed_and_refuses_bad_sigmas():
    from custom.metrics import SmoothedGainMetric

    _, target, lungs, initial = _noisy_followup(5)
    metric = SmoothedGainMetric([1.0, 0.0, 0.25], output_transform=lambda o: (o["pred"], o["label"], o["lungs"],
                                                                             o["image"]), sigma_name="sigma")
    assert _run_smoothed_gain(metric, [(target.clone(), target, lungs, initial)])["sigma"] == 0.0
    for sigmas in ([], [-0.5, 0.0], [4.0]):
        with pytest.raises(ValueError, match="sigmas"):
            SmoothedGainMetric(sigmas)
    with pytest.raises(RuntimeError, match="before any case"):
        SmoothedGainMetric([0.0]).compute()


def test_ensemble_crps_on_hand_computed_cases_and_a_gaussian_forecast():
    target = torch.tensor([[[[1.0, 5.0]]]])  # (1, 1, 1, 2); the second voxel is outside the mask
    mask = torch.tensor([[[[1, 0]]]])
    # one member: the absolute error
    assert masked_ensemble_crps(torch.full((1, 1, 1, 1, 2), 0.25), target, mask) == pytest.approx(0.75)
    # members 0 and 2 around 1: mean error 1, fair spread term |0 - 2| / (2 * 2 * 1) * 2 = 1
    members = torch.tensor([0.0, 2.0]).reshape(2, 1, 1, 1, 1).expand(2, 1, 1, 1, 2)
    assert masked_ensemble_crps(members, target, mask) == pytest.approx(0.0)
    # a calibrated ensemble (members and observation drawn from N(0, 1)) scores E CRPS = 1 / sqrt(pi)
    generator = torch.Generator().manual_seed(0)
    draws = torch.randn(4, 1, 40, 40, 40, generator=generator)
    observed = torch.randn(1, 40, 40, 40, generator=generator)
    full = torch.ones(1, 40, 40, 40)
    score = masked_ensemble_crps(draws, observed, full)
    assert score == pytest.approx(1 / math.sqrt(math.pi), abs=0.01)
    # a spread that is too small or too large scores worse than the calibrated one
    for scale in (0.3, 3.0):
        assert masked_ensemble_crps(scale * draws, observed, full) > score + 0.05
    with pytest.raises(ValueError, match="non-empty"):
        masked_ensemble_crps(members, target, torch.zeros_like(mask))


def test_sample_step_sweep_scores_gains_and_estimates_the_mean_of_eight():
    from scripts.sweep_sample_step import summarize

    def step(one: float, average: float, variance: float, crps: float) -> dict:
        return {"one": [one, one], "one_new": [one, one], "average": average, "average_new": average,
                "variance": variance, "variance_new": variance, "crps": crps}

    # identity's squared error 0.02; at t = 2 one sample halves it (+3.01 dB), at t = 1 it doubles it
    row = {"steps": [2, 1], "identity": 0.02, "identity_new": 0.02,
           "per_step": [step(0.01, 0.008, 0.004, 0.03), step(0.04, 0.03, 0.01, 0.05)]}
    table, best = summarize([row], chains=2)
    assert table[0]["one"] == pytest.approx(10 * math.log10(2))
    assert table[1]["one"] == pytest.approx(-10 * math.log10(2))
    # the mean of 8 from the mean of 2: 0.008 - 0.004 / 2 + 0.004 / 8 = 0.0065
    assert table[0]["mean_of_8_estimated"] == pytest.approx(10 * math.log10(0.02 / 0.0065))
    assert table[0]["mean_of_2"] == pytest.approx(10 * math.log10(0.02 / 0.008)) and best == 2
