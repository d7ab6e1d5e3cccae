"""Training batches: the forward diffusion processes put into MONAI's prepare_batch contract."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from custom.engines import (
    DiffusionPrepareBatch,
    GradientNormClipping,
    ResidualShiftPrepareBatch,
    SamplingPrepareBatch,
    WeightedMSELoss,
    loss_weight,
)
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
    inputs, target, _, kwargs = DiffusionPrepareBatch(scheduler)(batch)
    abar = scheduler.alphas_cumprod[kwargs["timesteps"]].reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(inputs[:, :1], abar.sqrt() * batch["target"] + (1 - abar).sqrt() * target, atol=1e-5)
    assert torch.equal(inputs[:, 1:], batch["image"]) and kwargs["context"] is None


def test_ddpm_target_follows_the_prediction_type_of_the_scheduler():
    batch = _batch()
    torch.manual_seed(2)
    _, eps, _, kwargs = DiffusionPrepareBatch(DDPMScheduler(num_train_timesteps=1000))(batch)
    torch.manual_seed(2)
    _, x0, _, _ = DiffusionPrepareBatch(DDPMScheduler(num_train_timesteps=1000, prediction_type="sample"))(batch)
    assert torch.equal(x0, batch["target"])
    torch.manual_seed(2)
    v_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    _, v, _, _ = DiffusionPrepareBatch(v_scheduler)(batch)
    # same draws (steps, then noise): the velocity of that noise, sqrt(abar) eps - sqrt(1 - abar) x0
    abar = v_scheduler.alphas_cumprod[kwargs["timesteps"]].reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * batch["target"], atol=1e-6)
    unknown = DDPMScheduler(num_train_timesteps=10)
    unknown.prediction_type = "score"
    with pytest.raises(ValueError, match="prediction_type 'score'"):
        DiffusionPrepareBatch(unknown)(batch)


def test_missing_text_is_a_clear_error_and_inference_needs_no_target():
    batch = _batch()
    del batch["text"]
    with pytest.raises(KeyError, match="lung-function text"):
        SamplingPrepareBatch(text_encoder=lambda t: torch.zeros(len(t), 1, 1))(batch)
    y0, x0, _, kwargs = SamplingPrepareBatch()({"image": batch["image"]})
    assert x0 is None and kwargs["context"] is None and torch.equal(y0, batch["image"])


def test_mean_patches_see_the_initial_scan_at_the_last_step():
    scheduler = ResidualShiftScheduler()
    batch = _batch()
    inputs, target, _, kwargs = ResidualShiftPrepareBatch(scheduler, mean_fraction=1.0)(batch)
    assert torch.equal(kwargs["timesteps"], torch.full((3,), 14))
    assert torch.allclose(inputs[:, :1], scheduler.scale_model_input(batch["image"], 14))
    assert torch.equal(target, batch["target"])
    with pytest.raises(ValueError, match="mean_fraction"):
        ResidualShiftPrepareBatch(scheduler, mean_fraction=1.5)
    torch.manual_seed(3)
    half = ResidualShiftPrepareBatch(scheduler, mean_fraction=0.5)({**_batch(), "image": torch.rand(400, 1, 2, 2, 2),
                                                                      "target": torch.rand(400, 1, 2, 2, 2)})
    share = float((half[3]["timesteps"] == 14).float().mean())
    assert 0.45 < share < 0.60  # half the patches, plus the uniform draws that land on the last step


def test_weighted_loss_counts_the_lungs_fully_and_the_rest_of_the_region_a_little():
    lungs = torch.zeros(1, 1, 4, 4, 4)
    lungs[..., 1:3, 1:3, 1:3] = 2  # a label map: any non-zero label is lung
    region = torch.zeros_like(lungs)
    region[..., :, :, 1:4] = 1
    weight = loss_weight(lungs, region, 0.1)
    assert weight[0, 0, 1, 1, 1] == 1 and weight[0, 0, 0, 0, 1] == pytest.approx(0.1) and weight[0, 0, 0, 0, 0] == 0
    batch = {"image": torch.rand(1, 1, 4, 4, 4), "target": torch.rand(1, 1, 4, 4, 4), "lungs": lungs, "mask": region}
    inputs, target, _, _ = ResidualShiftPrepareBatch(ResidualShiftScheduler(), lungs_key="lungs")(batch)
    assert target.shape == (1, 2, 4, 4, 4) and torch.equal(target[:, 1:], weight)
    prediction = torch.rand(1, 1, 4, 4, 4)
    expected = ((prediction - batch["target"]) ** 2 * weight).sum() / weight.sum()
    assert torch.allclose(WeightedMSELoss()(prediction, target), expected)
    # the DDPM baseline is weighted the same way: its target, the noise, with the weight channel
    _, noise_target, _, _ = DiffusionPrepareBatch(DDPMScheduler(num_train_timesteps=10), lungs_key="lungs")(batch)
    assert noise_target.shape == (1, 2, 4, 4, 4) and torch.equal(noise_target[:, 1:], weight)
    assert torch.allclose(WeightedMSELoss()(prediction, noise_target),
                          ((prediction - noise_target[:, :1]) ** 2 * weight).sum() / weight.sum())


def test_the_interval_reaches_the_network_in_training_and_evaluation_batches():
    batch = {**_batch(), "weeks": torch.tensor([26.0, 52.0, 70.0], dtype=torch.float64)}
    *_, kwargs = ResidualShiftPrepareBatch(ResidualShiftScheduler())(batch)
    assert kwargs["weeks"].dtype == torch.float32 and kwargs["weeks"].tolist() == [26.0, 52.0, 70.0]
    *_, kwargs = SamplingPrepareBatch()(batch)
    assert kwargs["weeks"].tolist() == [26.0, 52.0, 70.0]
    *_, kwargs = SamplingPrepareBatch()(_batch())
    assert "weeks" not in kwargs  # no interval known: the network's default


def _one_sgd_step(max_norm):
    """The weight change of one SGD step (lr 1) of a linear map on a loss with a gradient norm of 400."""
    from monai.engines import SupervisedTrainer

    network = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(network.weight)
    before = network.weight.detach().clone()
    data = [{"image": torch.full((2, 4), 10.0), "label": torch.full((2, 1), 10.0)}]
    trainer = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=data, network=network,
                                optimizer=torch.optim.SGD(network.parameters(), lr=1.0),
                                loss_function=torch.nn.MSELoss(), train_handlers=[GradientNormClipping(max_norm)])
    trainer.run()
    return (network.weight.detach() - before).norm().item(), trainer


def test_gradient_clipping_bounds_the_step_and_off_leaves_it():
    # d/dw mean((10 * sum(w) - 10)^2) at w = 0 is -200 per weight: a gradient norm of 400
    step, trainer = _one_sgd_step(1.0)
    assert step == pytest.approx(1.0, rel=1e-5)
    assert trainer.state.grad_norm == pytest.approx(400.0, rel=1e-5)
    assert _one_sgd_step(None)[0] == pytest.approx(400.0, rel=1e-5)
    assert _one_sgd_step(1000.0)[0] == pytest.approx(400.0, rel=1e-5)
    with pytest.raises(ValueError, match="max_norm"):
        GradientNormClipping(-1.0)
