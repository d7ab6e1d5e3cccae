"""Training batches: the forward diffusion processes put into MONAI's prepare_batch contract."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from custom.engines import ConditionalDDPMPrepareBatch, ResidualShiftPrepareBatch, SamplingPrepareBatch
from custom.scheduler import ResidualShiftScheduler


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(3, 1, 8, 8, 8, generator=g), "target": torch.rand(3, 1, 8, 8, 8, generator=g),
            "text": ["a", "b", "c"]}


def test_residual_shift_batch_is_the_scaled_forward_process_with_x0_target():
    scheduler = ResidualShiftScheduler()
    calls = []

    def encoder(texts):
        calls.append(list(texts))
        return torch.ones(len(texts), 4, 6)

    batch = _batch()
    torch.manual_seed(1)
    inputs, target, args, kwargs = ResidualShiftPrepareBatch(scheduler, text_encoder=encoder)(batch)
    t = kwargs["timesteps"]
    torch.manual_seed(1)
    torch.randint(0, 15, (3,))
    noise = torch.randn_like(batch["target"])
    x_t = scheduler.add_noise(batch["target"], batch["image"], noise, t)
    assert torch.allclose(inputs[:, :1], scheduler.scale_model_input(x_t, t), atol=1e-6)
    assert torch.equal(inputs[:, 1:], batch["image"]) and torch.equal(target, batch["target"])
    assert kwargs["context"].shape == (3, 4, 6) and calls == [["a", "b", "c"]] and args == ()


def test_ddpm_batch_learns_the_noise():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    batch = _batch()
    inputs, target, _, kwargs = ConditionalDDPMPrepareBatch(scheduler)(batch)
    abar = scheduler.alphas_cumprod[kwargs["timesteps"]].reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(inputs[:, :1], abar.sqrt() * batch["target"] + (1 - abar).sqrt() * target, atol=1e-5)
    assert torch.equal(inputs[:, 1:], batch["image"]) and kwargs["context"] is None


def test_missing_text_is_a_clear_error_and_inference_needs_no_target():
    batch = _batch()
    del batch["text"]
    with pytest.raises(KeyError, match="lung-function text"):
        SamplingPrepareBatch(text_encoder=lambda t: torch.zeros(len(t), 1, 1))(batch)
    y0, x0, _, kwargs = SamplingPrepareBatch()({"image": batch["image"]})
    assert x0 is None and kwargs["context"] is None and torch.equal(y0, batch["image"])
