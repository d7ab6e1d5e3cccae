"""Region-restricted PSNR/SSIM agree with their definitions and ignore what lies outside the region."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from monai.metrics import PSNRMetric, SSIMMetric

from custom.metrics import MaskedImageMetric, masked_psnr, masked_ssim


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
