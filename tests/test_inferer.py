"""Whole-volume sliding-window sampling (residual shift and DDPM/DDIM baseline), and what a trained denoiser gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from custom.engines import ResidualShiftPrepareBatch, WeightedMSELoss
from custom.inferer import DiffusionSamplingInferer, ResidualShiftInferer, SamplingOutput
from custom.networks import AttentionDiffusionUNet, MeanPredictionUNet
from custom.scheduler import ResidualShiftScheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def _true_x0(y0: torch.Tensor) -> torch.Tensor:
    """The toy follow-up of a toy initial scan: a voxel-wise, non-linear change."""
    return 0.8 * y0**2 + 0.05


class _ResidualOracle(torch.nn.Module):
    """Returns the true x0 in every window, read from the y0 channel."""

    def forward(self, x, timesteps, context=None):
        return _true_x0(x[:, 1:2])


class _EpsilonOracle(torch.nn.Module):
    """Returns the true noise of x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, for the DDPM baseline."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.alphas_cumprod = alphas_cumprod

    def forward(self, x, timesteps, context=None):
        abar = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1, 1)
        return (x[:, :1] - abar.sqrt() * _true_x0(x[:, 1:2])) / (1 - abar).sqrt()


class _Pointwise(torch.nn.Module):
    """Translation-equivariant, timestep- and context-dependent network: windows cannot change its answer.

    It records what each call received, to check how the sliding window's window batches are fed.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Conv3d(2, 1, 1)
        self.calls: list[tuple[int, list[int], int | None]] = []

    @property
    def steps(self) -> list[int]:
        return [timesteps[0] for _, timesteps, _ in self.calls]

    def forward(self, x, timesteps, context=None):
        self.calls.append((x.shape[0], timesteps.tolist(), None if context is None else context.shape[0]))
        shift = 0.0 if context is None else context.mean()
        return self.mix(x) * (1 + 0.05 * timesteps.float().reshape(-1, 1, 1, 1, 1)) + shift


def test_oracle_denoiser_makes_sampling_return_x0_through_sliding_windows():
    y0 = torch.rand(2, 1, 24, 20, 16, generator=torch.Generator().manual_seed(3))
    for mode in ("gaussian", "constant"):
        inferer = ResidualShiftInferer(
            ResidualShiftScheduler(num_train_timesteps=15), roi_size=(12, 12, 8), sw_batch_size=3, overlap=0.5,
            mode=mode, prediction="sample",
        )
        out = inferer(y0, _ResidualOracle())
        assert out.shape == y0.shape
        assert torch.allclose(out, _true_x0(y0), atol=1e-6)


def test_window_batches_get_the_step_and_context_and_steps_run_backwards():
    y0 = torch.rand(1, 1, 24, 24, 16, generator=torch.Generator().manual_seed(4))
    net = _Pointwise()
    # 3 x 3 x 1 windows in batches of 4: the last batch has a single window
    inferer = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=(12, 12, 16), sw_batch_size=4, overlap=0.5,
                                   prediction="sample")
    inferer(y0, net, torch.randn(1, 6, 5))
    assert [n for n, _, _ in net.calls] == [4, 4, 1] * 15
    assert all(len(set(timesteps)) == 1 and len(timesteps) == n == rows for n, timesteps, rows in net.calls)
    assert net.steps == [t for t in range(14, -1, -1) for _ in range(3)]


def test_sliding_window_sampling_equals_single_window_sampling():
    y0 = torch.rand(1, 1, 32, 32, 24, generator=torch.Generator().manual_seed(4))
    context = torch.randn(1, 4, 6)
    net = _Pointwise()
    whole = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=(32, 32, 24), seed=5,
                                 prediction="sample")(y0, net, context)
    for mode in ("gaussian", "constant"):
        windows = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=16, overlap=0.25, mode=mode, seed=5,
                                       prediction="sample")
        assert torch.allclose(windows(y0, net, context), whole, atol=1e-5)


def test_samples_are_reproducible_and_give_mean_and_uncertainty():
    y0 = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(6))
    net = _Pointwise()
    inferer = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=16, num_samples=3, seed=1, prediction="sample")
    out = inferer.sample(y0, net)
    assert isinstance(out, SamplingOutput) and out.samples.shape == (3, 2, 1, 16, 16, 16)
    assert torch.allclose(out.mean, out.samples.mean(0)) and torch.allclose(out.std, out.samples.std(0, unbiased=False))
    assert out.std.mean() > 0
    assert torch.equal(inferer(y0, net), out.mean)
    other = inferer.sample(y0, net, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(other.mean, out.mean)
    two_channels = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=16, num_samples=3, seed=1,
                                        return_uncertainty=True, prediction="sample")
    assert torch.equal(two_channels(y0, net), torch.cat([out.mean, out.std], dim=1))
    # the default product is the mean prediction; the samples give only its uncertainty channel
    mean_mode = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=16, num_samples=3, seed=1,
                                     return_uncertainty=True)
    both = mean_mode(y0, net)
    assert torch.equal(both[:, :1], mean_mode.predict_mean(y0, net)) and torch.equal(both[:, 1:], out.std)


def test_a_chain_stopped_at_step_k_returns_that_steps_x0_prediction_after_the_same_steps():
    y0 = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(6))
    scheduler = ResidualShiftScheduler()
    full, stopped = _Pointwise(), _Pointwise()
    seen = {}
    ResidualShiftInferer(scheduler, roi_size=16, seed=2).sample_one(
        full, y0, None, torch.Generator().manual_seed(2), on_step=lambda t, x_t, out: seen.setdefault(t, out))
    sample = ResidualShiftInferer(scheduler, roi_size=16, sample_output_step=5).sample_one(
        stopped, y0, None, torch.Generator().manual_seed(2))
    # steps T..5 (indices 14..4) are run with the same noise, then the x0 prediction of step 5 is returned
    assert stopped.steps == list(range(14, 3, -1)) and full.steps == list(range(14, -1, -1))
    assert torch.equal(sample, seen[4])
    # an oracle's x0 prediction is exact at every step, so any stop returns x0
    oracle = ResidualShiftInferer(scheduler, roi_size=16, sample_output_step=8, prediction="sample")
    assert torch.allclose(oracle(y0, _ResidualOracle()), _true_x0(y0), atol=1e-6)
    # the DDPM baseline stops the same way, on the x0 its scheduler derives from the predicted noise
    ddim = DDIMScheduler(num_train_timesteps=1000)
    stopped_ddim = DiffusionSamplingInferer(ddim, num_inference_steps=10, roi_size=16, sample_output_step=3)
    assert torch.allclose(stopped_ddim(y0, _EpsilonOracle(ddim.alphas_cumprod)), _true_x0(y0), atol=1e-3)
    for bad in (0, 16):
        with pytest.raises(ValueError, match="sample_output_step"):
            ResidualShiftInferer(scheduler, sample_output_step=bad)


def test_mean_prediction_is_one_call_at_the_last_step_on_the_initial_scan():
    y0 = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(8))
    net = _Pointwise()
    scheduler = ResidualShiftScheduler()
    inferer = ResidualShiftInferer(scheduler, roi_size=16)
    out = inferer(y0, net)
    assert net.steps == [scheduler.num_train_timesteps - 1] and len(net.calls) == 1
    # the input is the prior's mean y0 (scaled), not x0 + eta_T e0, which would leak the follow-up
    expected = net.mix(torch.cat([scheduler.scale_model_input(y0, 14), y0], 1)) * (1 + 0.05 * 14)
    assert torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        ResidualShiftInferer(scheduler, prediction="median")


def test_mean_prediction_is_the_sliding_window_over_the_image_to_image_network():
    """predict_mean runs the windows through MeanPredictionUNet's image-only call, with the results of the
    former formula (the denoiser on [scale_model_input(y0, T-1), y0] at T-1), for any denoiser."""
    scheduler = ResidualShiftScheduler()
    t = scheduler.num_train_timesteps - 1
    torch.manual_seed(0)
    kwargs = dict(channels=(8, 16, 16), attention_levels=(False, True, True), norm_num_groups=4,
                  num_head_channels=8, context_dim=6, residual_output=True)
    denoiser = AttentionDiffusionUNet(**kwargs).eval()
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mean_net = MeanPredictionUNet(t, float(scheduler.scale_model_input(torch.ones(1), t)), **kwargs).eval()
    mean_net.load_state_dict(denoiser.state_dict())
    y0 = torch.rand(2, 1, 24, 20, 16, generator=torch.Generator().manual_seed(9))
    context = torch.randn(2, 4, 6)
    inferer = ResidualShiftInferer(scheduler, roi_size=16, overlap=0.5)
    former = torch.cat([
        inferer.denoise(denoiser, scheduler.scale_model_input(y0[b : b + 1], t), y0[b : b + 1], t, context[b : b + 1])
        for b in range(2)
    ])
    assert torch.equal(inferer.predict_mean(y0, denoiser, context), former)
    assert torch.equal(inferer.predict_mean(y0, mean_net, context), former)
    # one window, uniform blending: the network's own image-to-image output (cases run one at a time)
    window = y0[:, :, :16, :16, :16]
    with torch.no_grad():
        direct = torch.cat([mean_net(window[b : b + 1], context=context[b : b + 1]) for b in range(2)])
    one_window = ResidualShiftInferer(scheduler, roi_size=16, mode="constant")
    assert torch.equal(one_window.predict_mean(window, mean_net, context), direct)


def test_mean_smoothing_filters_the_returned_mean_only():
    """mean_smoothing_sigma Gaussian-filters the mean prediction (what the inference config ships) and the mean
    of the samples that "sample" mode returns, leaves the samples themselves alone, and refuses a negative or
    absurd sigma."""
    from scipy import ndimage

    scheduler = ResidualShiftScheduler()
    torch.manual_seed(0)
    net = AttentionDiffusionUNet(channels=(8, 16, 16), attention_levels=(False, True, True), norm_num_groups=4,
                                 num_head_channels=8, residual_output=True).eval()
    y0 = torch.rand(1, 1, 24, 20, 16, generator=torch.Generator().manual_seed(3))
    plain = ResidualShiftInferer(scheduler, roi_size=16, overlap=0.5)
    smooth = ResidualShiftInferer(scheduler, roi_size=16, overlap=0.5, mean_smoothing_sigma=0.5)
    raw, filtered = plain.predict_mean(y0, net), smooth.predict_mean(y0, net)
    expected = ndimage.gaussian_filter(raw.numpy(), sigma=(0, 0, 0.5, 0.5, 0.5))
    assert np.allclose(filtered.numpy(), expected, atol=1e-6) and not torch.allclose(filtered, raw, atol=1e-3)
    assert torch.equal(smooth(y0, net), filtered)
    samples = [inferer.sample(y0, net, num_samples=1, generator=torch.Generator().manual_seed(1)).mean
               for inferer in (plain, smooth)]
    assert torch.equal(*samples)
    sample_mode = ResidualShiftInferer(scheduler, roi_size=16, overlap=0.5, prediction="sample",
                                       mean_smoothing_sigma=0.5)
    expected = ndimage.gaussian_filter(sample_mode.sample(y0, net).mean.numpy(), sigma=(0, 0, 0.5, 0.5, 0.5))
    assert np.allclose(sample_mode(y0, net).numpy(), expected, atol=1e-6)
    for sigma in (-0.5, 5.0):
        with pytest.raises(ValueError, match="mean_smoothing_sigma"):
            ResidualShiftInferer(scheduler, mean_smoothing_sigma=sigma)


def test_monai_label_call_with_the_image_alone():
    torch.manual_seed(0)
    net = AttentionDiffusionUNet(channels=(8, 16, 16), attention_levels=(False, True, True), norm_num_groups=4,
                                 num_head_channels=8, context_dim=12).eval()
    y0 = torch.rand(1, 1, 24, 16, 16)
    out = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=16, overlap=0.5)(y0, net)
    assert out.shape == y0.shape and torch.isfinite(out).all()
    texts = []

    def encoder(batch):
        texts.append(list(batch))
        return torch.ones(len(batch), 3, 12)

    inferer = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=16, text_encoder=encoder,
                                   default_text="no record")
    assert inferer(y0, net).shape == y0.shape and texts == [["no record"]]


def test_text_in_the_image_metadata_reaches_the_model_when_no_context_is_passed():
    """MONAI Label calls ``inferer(image[None], network)``: the record's text rides in the image's metadata."""
    from monai.data import MetaTensor

    from custom.clinical.text import LungFunctionTextd

    net = _Pointwise()
    texts = []

    def encoder(batch):
        texts.append(list(batch))
        return torch.stack([torch.full((3, 4), float(len(t))) for t in batch])

    inferer = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=8, text_encoder=encoder,
                                   default_text="no record")
    image = MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.eye(4))
    case = LungFunctionTextd("record", image_key="image")({"image": image, "record": {"FVC": 2400}})
    y0 = case["image"][None]  # what MONAI Label's run_inferer passes
    with_text = inferer(y0, net)
    assert texts == [[case["text"]]] and "forced vital capacity 2400 ml" in case["text"]
    assert not torch.allclose(with_text, inferer(image[None], net))  # no text in the metadata: the default
    assert texts[-1] == ["no record"]
    assert torch.equal(inferer(y0, net, context=encoder(["no record"])), inferer(image[None], net))  # context wins
    # a collated batch carries one text per case
    batch = MetaTensor(torch.rand(2, 1, 8, 8, 8), meta={"text": ["a", "bb"]})
    batch.is_batch = True
    inferer(batch, net)
    assert texts[-1] == ["a", "bb"]


def _toy_pair(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.rand(n, 1, 16, 16, 16, generator=g) * 0.2 + 0.3
    y0 = x0.clone()
    y0[:, :, 4:12, 4:12, 4:12] += 0.25  # the fixed residual the model must learn to remove
    return x0, y0


def test_trained_small_denoiser_beats_the_identity_prediction():
    """The live training step (prepare batch + weighted loss) teaches both products, the mean and a sample."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    scheduler = ResidualShiftScheduler()
    prepare = ResidualShiftPrepareBatch(scheduler, mean_fraction=0.5, lungs_key="lungs")
    net = AttentionDiffusionUNet(channels=(8, 16), attention_levels=(False, False), norm_num_groups=4,
                                 num_head_channels=8, with_conditioning=False, residual_output=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(200):
        x0, y0 = _toy_pair(g, 4)
        batch = {"image": y0, "target": x0, "lungs": torch.ones_like(x0), "mask": torch.ones_like(x0)}
        inputs, target, _, kwargs = prepare(batch)
        loss = WeightedMSELoss()(net(inputs, **kwargs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x0, y0 = _toy_pair(torch.Generator().manual_seed(99), 2)  # held-out images and sampling noise
    mse_identity = torch.mean((y0 - x0) ** 2).item()
    for prediction in ("mean", "sample"):
        inferer = ResidualShiftInferer(scheduler, roi_size=16, seed=11, prediction=prediction)
        mse_model = torch.mean((inferer(y0, net) - x0) ** 2).item()
        assert mse_model < 0.6 * mse_identity, (prediction, mse_model, mse_identity)


def test_ddpm_and_ddim_baselines_sample_the_whole_volume_from_noise():
    y0 = torch.rand(1, 1, 24, 16, 16, generator=torch.Generator().manual_seed(13))
    ddim = DDIMScheduler(num_train_timesteps=1000)
    oracle = _EpsilonOracle(ddim.alphas_cumprod)
    # with the true noise, deterministic DDIM ends exactly on x0, through the sliding windows
    out = DiffusionSamplingInferer(ddim, num_inference_steps=10, roi_size=16, overlap=0.5)(y0, oracle)
    assert torch.allclose(out, _true_x0(y0), atol=1e-4)
    net = _Pointwise()
    ddpm = DiffusionSamplingInferer(DDPMScheduler(num_train_timesteps=1000), num_inference_steps=20, roi_size=16)
    out = ddpm(y0, net)
    assert out.shape == y0.shape and torch.isfinite(out).all()
    # one call of both windows per step, the scheduler's 20 steps from the noisiest one down
    assert [n for n, _, _ in net.calls] == [2] * 20
    assert net.steps == ddpm.scheduler.timesteps.tolist() and net.steps[0] > 900


def test_channels_last_and_window_batching_keep_the_sample_equal():
    """The speed options of the benchmark change memory layout and batching, not the result."""
    torch.manual_seed(0)
    net = AttentionDiffusionUNet(channels=(8, 16, 16), attention_levels=(False, True, True), norm_num_groups=4,
                                 num_head_channels=8, context_dim=6).eval()
    with torch.no_grad():
        for p in net.parameters():  # leave the zero-initialised identity so that the layout really matters
            p.add_(0.05 * torch.randn_like(p))
    y0 = torch.rand(1, 1, 32, 32, 24, generator=torch.Generator().manual_seed(8))
    context = torch.randn(1, 4, 6)
    reference = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=16, sw_batch_size=1, seed=3,
                                     prediction="sample")(y0, net, context)
    fast_net = net.to(memory_format=torch.channels_last_3d)
    fast = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=16, sw_batch_size=8, channels_last=True, seed=3,
                                prediction="sample")
    result = fast(y0, fast_net, context)
    assert not torch.allclose(reference, y0, atol=1e-3)
    # float rounding accumulated over 15 steps; 1e-4 of the 1200 HU window is 0.12 HU
    assert torch.allclose(result, reference, atol=1e-4), float((result - reference).abs().max())


class _WeeksNetwork(_Pointwise):
    """``_Pointwise`` plus the interval: adds weeks / 100 to its output and records what it received."""

    def __init__(self) -> None:
        super().__init__()
        self.weeks: list[list[float] | None] = []

    def forward(self, x, timesteps, context=None, weeks=None):
        self.weeks.append(None if weeks is None else weeks.tolist())
        out = super().forward(x, timesteps, context)
        return out if weeks is None else out + weeks.reshape(-1, 1, 1, 1, 1) / 100.0


def test_the_interval_reaches_the_network_from_the_call_or_the_image_metadata():
    from monai.data import MetaTensor

    from custom.data import FollowupIntervald

    net = _WeeksNetwork()
    inferer = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=8)
    image = MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.eye(4))
    plain = inferer(image[None], net)
    assert net.weeks[-1] is None
    at_78 = inferer(image[None], net, weeks=78.0)
    assert net.weeks[-1] == [78.0] and torch.allclose(at_78 - plain, torch.full_like(plain, 0.78), atol=1e-5)
    case = FollowupIntervald(weeks=26, image_key="image")({"image": image})
    assert case["weeks"] == 26.0 and "weeks" not in image.meta  # the caller's image is left as it was
    from_meta = inferer(case["image"][None], net)
    assert net.weeks[-1] == [26.0] and torch.allclose(from_meta - plain, torch.full_like(plain, 0.26), atol=1e-5)
    two = torch.rand(2, 1, 8, 8, 8)
    inferer.sample(two, net, weeks=torch.tensor([30.0, 60.0]))
    assert net.weeks[-1] == [60.0]  # one case at a time, each with its own interval


def test_followup_interval_is_read_from_the_follow_up_record_and_checked():
    from custom.data import FollowupIntervald

    read = FollowupIntervald()
    assert read({"patient": "P1", "followup_record": {"FollowupWeeks": 38}})["weeks"] == 38.0
    with pytest.raises(ValueError, match="P2: no FollowupWeeks"):
        read({"patient": "P2", "followup_record": {"FollowupFVC": 2000}})
    with pytest.raises(ValueError, match="P3: no FollowupWeeks"):
        read({"patient": "P3"})
    with pytest.raises(ValueError, match="P4: FollowupWeeks: weeks must be between 1 and 260"):
        read({"patient": "P4", "followup_record": {"FollowupWeeks": -5}})
    with pytest.raises(ValueError, match="weeks must be between"):
        FollowupIntervald(weeks=1000)
    # an interval asked for wins over the record's
    assert FollowupIntervald(weeks=78)({"followup_record": {"FollowupWeeks": 38}})["weeks"] == 78.0
