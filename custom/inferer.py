"""Whole-volume diffusion sampling with sliding windows (CIResDiff Sec. 2.2, 3.1).

Every reverse step runs the denoiser over the *whole* volume with MONAI's
``SlidingWindowInferer`` (overlapping windows blended with a Gaussian or constant importance map)
and only then updates the volume, so neighbouring windows never disagree about the sample they
share: there is one x_t per step, not one per patch.

There is one sampling loop (``DiffusionSamplingInferer.sample_one``), written against the scheduler
protocol of MONAI's ``monai.networks.schedulers`` (``set_timesteps``, ``timesteps``, ``step``
returning ``(prev_sample, pred_original_sample)``), as MONAI's ``DiffusionInferer.sample`` is. The
diffusions differ only in two hooks, as ``custom.engines.DiffusionPrepareBatch`` does in training:

- ``DiffusionSamplingInferer`` itself is the conditional DDPM/DDIM (the paper's DM / DM-CIP
  baseline): x_T is pure noise and the network sees x_t unscaled.
- ``ResidualShiftInferer`` (the full model, DM-R / DM-R-CIP): x_T = y0 + kappa sqrt(eta_T) noise,
  the network sees x_t scaled by the scheduler; by default it returns the mean prediction, one
  network pass at t = T on x_T = y0, instead of samples.

Every diffusion calls the same denoiser ``network(torch.cat([x_t, y0], 1), timesteps, context)``
(with ``weeks=``, the interval to the follow-up, when one is known). The inferers follow MONAI's
``Inferer`` contract: ``inferer(inputs, network)`` with the initial scan alone returns the
generated follow-up (MONAI Label calls it this way); the lung-function text context and the
interval are optional keywords, and without them the text and interval in the inputs' metadata
(or the "not measured" text and the network's default interval) are used. The denoisers are
trained by the one training step of ``custom.engines`` (its prepare-batch classes), not here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep
from tqdm.auto import tqdm

from custom.clinical.encoder import EncodeTexts
from custom.engines import plain_tensor
from custom.geometry import MAX_SMOOTHING_SIGMA, gaussian_smooth
from custom.networks import mean_prediction_input
from custom.scheduler import ResidualShiftScheduler


@dataclass
class SamplingOutput:
    """Result of ``DiffusionSamplingInferer.sample``.

    Attributes:
        mean: mean of the samples, (B, 1, D, H, W): the generated follow-up.
        std: voxel-wise standard deviation of the samples (an uncertainty map), same shape; zero
            for a single sample.
        samples: all samples, (num_samples, B, 1, D, H, W).
    """

    mean: torch.Tensor
    std: torch.Tensor
    samples: torch.Tensor


def _like_inputs(output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The output with the inputs' metadata (affine, file name) when the inputs carried any."""
    if not isinstance(inputs, MetaTensor):
        return output
    return MetaTensor(output, affine=inputs.affine, meta=dict(inputs.meta))


def _randn(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (for reproducibility), returned like ``like``."""
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=device).to(like)


class _WindowNetwork:
    """The denoiser at one reverse step, as ``SlidingWindowInferer`` calls it: windows in, windows out.

    The sliding window passes ``sw_batch_size`` windows at a time; this broadcasts the step's
    timestep, the case's context (1, L, D) and its interval (1,) to that window batch, runs the
    network (under autocast when asked) and returns its output in the windows' dtype, so the blending and the
    scheduler update stay in full precision. With ``mean_input_scale`` the windows hold y0 alone
    and the network gets the mean prediction's input (``custom.networks.mean_prediction_input``),
    the image-to-image call of ``MeanPredictionUNet``.
    """

    def __init__(
        self, network: Callable, timestep: int, context: torch.Tensor | None, autocast_dtype: torch.dtype | None,
        channels_last: bool = False, mean_input_scale: float | None = None, weeks: torch.Tensor | None = None,
    ) -> None:
        self.network = network
        self.timestep = timestep
        self.context = context
        # a network without an interval input is called as before
        self.kwargs = {} if weeks is None else {"weeks": weeks}
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.mean_input_scale = mean_input_scale

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        n = windows.shape[0]
        if self.mean_input_scale is None:
            inputs = windows
            timesteps = torch.full((n,), self.timestep, device=windows.device, dtype=torch.long)
        else:
            inputs, timesteps = mean_prediction_input(windows, self.timestep, self.mean_input_scale)
        context = None if self.context is None else self.context.expand(n, *self.context.shape[1:])
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(windows.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.network(inputs, timesteps, context, **self.kwargs)
        return out.to(windows.dtype).contiguous()


class DiffusionSamplingInferer(Inferer):
    """The sampling loop over the whole volume, several samples, uncertainty; itself the conditional DDPM.

    As the DM baseline, x_T ~ N(0, I) and the scheduler (a MONAI ``DDPMScheduler``, e.g. T = 1000,
    or ``DDIMScheduler``, e.g. 50 steps) takes the network's prediction of what its
    ``prediction_type`` says (``"epsilon"`` by default: the noise, Ho et al. 2020).

    Args:
        scheduler: the scheduler the network was trained with; it offers ``set_timesteps``,
            ``timesteps`` and ``step``.
        num_inference_steps: reverse steps; ``None`` uses all ``num_train_timesteps``.
        roi_size: window size (the training patch size).
        sw_batch_size: windows per network call.
        overlap: fraction of overlap between neighbouring windows.
        mode: blending of overlapping windows, ``"gaussian"`` or ``"constant"``.
        sigma_scale: standard deviation of the Gaussian importance map relative to the window.
        num_samples: samples drawn per case; the prediction is their mean.
        sample_output_step: the reverse step t (T..1, counted as in the papers: 1 is the last) whose
            x0 prediction a chain returns as its sample. 1 runs the whole chain and returns x_0; t > 1
            stops the chain there and returns the denoiser's x0 prediction, the posterior mean
            E[x0 | x_t, y0] of Tweedie's formula (Efron 2011): a *denoised* sample that keeps the
            uncertainty the chain has resolved down to t (where the lesions grow) and not the voxel
            noise of the last steps. The mean of such samples is the conditional mean E[x0 | y0]
            (tower rule), as for full samples. The value belongs to the weights, chosen on their
            validation fold (``custom.checkpoints.sample_output_step``).
        return_uncertainty: ``__call__`` returns ``[mean, std]`` as two channels instead of the mean alone.
        mean_smoothing_sigma: Gaussian sigma in voxels applied to the returned follow-up, a mean (of the
            samples here, ``ResidualShiftInferer``'s mean prediction there; 0: none). The value belongs
            to the weights: their training's validation chooses it (``custom.metrics.SmoothedGainMetric``)
            and writes it beside them (``custom.checkpoints.mean_smoothing_sigma`` reads it).
        text_encoder: maps texts to context features (B, L, D); used only when no context is given.
        default_text: the text encoded when no context is given and the inputs carry no text in their
            metadata (e.g. the "not measured" record).
        progress: show a progress bar over the reverse steps.
        seed: seed of the sampling noise, fixed per call so that a case always gives the same
            sample; ``None`` uses the global random state.
        autocast_dtype: run the network under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16`` or ``"bfloat16"``); ``None`` runs it in the input's precision.
        channels_last: pass the windows in ``channels_last_3d`` memory format (convert the network
            with ``network.to(memory_format=torch.channels_last_3d)`` too); faster convolutions on
            GPUs with tensor cores, same result up to rounding.
        text_key: key of the lung-function text in the inputs' metadata (a ``MetaTensor``'s), encoded
            when no context is given (``custom.clinical.text.LungFunctionTextd``'s ``image_key``).
        weeks_key: key of the interval to the follow-up in the inputs' metadata, used when no
            ``weeks`` is given (``custom.data.FollowupIntervald``'s ``image_key``).
    """

    def __init__(
        self,
        scheduler: torch.nn.Module,
        num_inference_steps: int | None = None,
        roi_size: Sequence[int] | int = 96,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        mode: str = "gaussian",
        sigma_scale: float = 0.125,
        num_samples: int = 1,
        sample_output_step: int = 1,
        return_uncertainty: bool = False,
        mean_smoothing_sigma: float = 0.0,
        text_encoder: EncodeTexts | None = None,
        default_text: str | None = None,
        progress: bool = False,
        seed: int | None = 0,
        autocast_dtype: torch.dtype | str | None = None,
        channels_last: bool = False,
        text_key: str = "text",
        weeks_key: str = "weeks",
    ) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps or scheduler.num_train_timesteps
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        if not 0.0 <= mean_smoothing_sigma <= MAX_SMOOTHING_SIGMA:
            raise ValueError(f"mean_smoothing_sigma must be in [0, {MAX_SMOOTHING_SIGMA:g}] voxels, "
                             f"got {mean_smoothing_sigma}.")
        if text_encoder is not None and default_text is None:
            raise ValueError("a text encoder needs default_text for calls without a lung-function record.")
        # created once: its importance map is cached and reused at every step of every case
        self.window = SlidingWindowInferer(
            roi_size=ensure_tuple_rep(roi_size, 3),
            sw_batch_size=sw_batch_size,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            cache_roi_weight_map=True,
            progress=False,
        )
        if not 1 <= sample_output_step <= self.num_inference_steps:
            raise ValueError(f"sample_output_step must be in [1, {self.num_inference_steps}] (the reverse steps), "
                             f"got {sample_output_step}.")
        self.num_samples = num_samples
        self.sample_output_step = int(sample_output_step)
        self.return_uncertainty = return_uncertainty
        self.mean_smoothing_sigma = float(mean_smoothing_sigma)
        self.text_encoder = text_encoder
        self.default_text = default_text
        self.progress = progress
        self.seed = seed
        self.autocast_dtype = getattr(torch, autocast_dtype) if isinstance(autocast_dtype, str) else autocast_dtype
        self.channels_last = channels_last
        self.text_key = text_key
        self.weeks_key = weeks_key

    def denoise(
        self, network: Callable, x_t: torch.Tensor, y0: torch.Tensor, timestep: int, context: torch.Tensor | None,
        weeks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network's output over the whole volume at one step, blended from the windows.

        Args:
            network: the denoiser.
            x_t: the network's view of the current sample (already scaled if the diffusion scales it), (1, 1, ...).
            y0: the initial scan, (1, 1, ...).
            timestep: the step index given to the network.
            context: text features of this case (1, L, D) or ``None``.
            weeks: the case's interval to the follow-up (1,) or ``None``.
        """
        window_network = _WindowNetwork(network, timestep, context, self.autocast_dtype, self.channels_last,
                                        weeks=weeks)
        return self.window(torch.cat([x_t, y0], dim=1), window_network)

    def prior(self, y0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The start of the reverse process, x_T: pure noise for the DDPM.

        Args:
            y0: the initial scan of one case, (1, 1, D, H, W).
            noise: standard normal noise of the same shape.
        """
        return noise

    def model_input(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        """The network's view of x_t: x_t itself for the DDPM.

        Args:
            x_t: the current sample.
            timestep: its step index.
        """
        return x_t

    def sample_one(
        self, network: Callable, y0: torch.Tensor, context: torch.Tensor | None, generator: torch.Generator | None,
        weeks: torch.Tensor | None = None, on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """One sample of the follow-up for one case: x_T from ``prior``, then the scheduler's reverse steps
        down to ``sample_output_step``, whose x0 prediction is returned (x_0 itself when that is the last step).

        Args:
            network: the denoiser.
            y0: the initial scan of one case, (1, 1, D, H, W).
            context: its text features (1, L, D) or ``None``.
            generator: random generator of the sampling noise, or ``None`` for the global state.
            weeks: its interval to the follow-up (1,) or ``None``.
            on_step: called after every step with the step index, that step's x_t and the network's
                output for it (e.g. ``scripts/trace_chain.py``'s record of the chain).
        """
        scheduler = self.scheduler.to(y0.device)
        scheduler.set_timesteps(self.num_inference_steps, device=y0.device)
        x_t = self.prior(y0, _randn(y0.shape, y0, generator))
        steps = scheduler.timesteps.tolist()
        for t in self._steps(steps[: len(steps) - self.sample_output_step + 1]):
            model_output = self.denoise(network, self.model_input(x_t, int(t)), y0, int(t), context, weeks)
            x_prev, x0_pred = scheduler.step(model_output, int(t), x_t, generator=generator)
            if on_step is not None:
                on_step(int(t), x_t, model_output)
            x_t = x_prev
        # after the last step x_t is x_0; a chain stopped earlier returns that step's x0 prediction
        return x_t if self.sample_output_step == 1 else x0_pred

    def _context(self, inputs: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        """The text context of the cases in ``inputs`` (B, 1, ...): ``context`` when given, else the encoded text.

        Without ``context`` the text is the inputs' metadata's ``text_key`` when they carry one per
        case (``custom.clinical.text.LungFunctionTextd`` with ``image_key`` puts it there; MONAI Label
        calls ``inferer(image[None], network)`` with no context), else ``default_text``.
        """
        if context is not None or self.text_encoder is None:
            return context
        batch_size, device = inputs.shape[0], inputs.device
        texts = inputs.meta.get(self.text_key) if isinstance(inputs, MetaTensor) else None
        texts = [texts] * batch_size if isinstance(texts, str) else texts
        one_per_case = isinstance(texts, (list, tuple)) and len(texts) == batch_size
        if not (one_per_case and all(isinstance(t, str) for t in texts)):
            texts = [self.default_text] * batch_size
        if len(set(texts)) == 1:
            return self.text_encoder([texts[0]]).to(device).expand(batch_size, -1, -1)
        return self.text_encoder(list(texts)).to(device)

    def _weeks(self, inputs: torch.Tensor, weeks: torch.Tensor | float | None) -> torch.Tensor | None:
        """The interval of every case in ``inputs`` as a (B,) tensor: ``weeks`` when given, else the inputs'
        metadata's ``weeks_key``, else ``None`` (the network's default)."""
        if weeks is None and isinstance(inputs, MetaTensor):
            weeks = inputs.meta.get(self.weeks_key)
        if weeks is None:
            return None
        weeks = torch.as_tensor(weeks, dtype=torch.float32, device=inputs.device).reshape(-1)
        return weeks.expand(inputs.shape[0]) if weeks.numel() == 1 else weeks

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def smooth_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The mean follow-up Gaussian-filtered by ``mean_smoothing_sigma`` (as it is when 0)."""
        return gaussian_smooth(mean, self.mean_smoothing_sigma) if self.mean_smoothing_sigma > 0 else mean

    def _steps(self, steps: Iterable[int]) -> Iterable[int]:
        return tqdm(steps, desc="reverse diffusion", leave=False) if self.progress else steps

    @torch.inference_mode()
    def sample(
        self,
        inputs: torch.Tensor,
        network: Callable,
        context: torch.Tensor | None = None,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        weeks: torch.Tensor | float | None = None,
    ) -> SamplingOutput:
        """Draw samples of the follow-up of every case in ``inputs`` and summarise them.

        Cases are sampled one at a time: MONAI's sliding window mixes windows of different cases
        in one network call, and each case has its own context.

        Args:
            inputs: initial scans y0, (B, 1, D, H, W).
            network: the denoiser.
            context: text token features (B, L, D) or ``None``.
            num_samples: samples per case; ``None`` uses the inferer's ``num_samples``.
            generator: random generator of the sampling noise; ``None`` seeds one from ``seed``.
            weeks: interval to the follow-up, one per case or one for all; ``None`` reads the metadata.
        """
        context = self._context(inputs, context)
        weeks = self._weeks(inputs, weeks)
        y0 = plain_tensor(inputs)
        generator = generator if generator is not None else self._generator(y0.device)
        num_samples = num_samples or self.num_samples
        samples = torch.stack(
            [
                torch.cat(
                    [
                        self.sample_one(network, y0[b : b + 1], None if context is None else context[b : b + 1],
                                        generator, None if weeks is None else weeks[b : b + 1])
                        for b in range(y0.shape[0])
                    ]
                )
                for _ in range(num_samples)
            ]
        )
        return SamplingOutput(mean=samples.mean(0), std=samples.std(0, unbiased=False), samples=samples)

    def __call__(
        self, inputs: torch.Tensor, network: Callable, context: torch.Tensor | None = None,
        weeks: torch.Tensor | float | None = None, *args, **kwargs
    ) -> torch.Tensor:
        """Generate the follow-up of every case in ``inputs`` (the initial scans, (B, 1, D, H, W)).

        Args:
            inputs: initial scans y0.
            network: the denoiser.
            context: text token features (B, L, D) or ``None``.
            weeks: interval to the follow-up (B,) or one number; ``None`` reads the inputs' metadata.
            args: unused, for the ``Inferer`` signature.
            kwargs: unused, for the ``Inferer`` signature.

        Returns:
            the follow-up (B, 1, ...): ``direct_prediction`` when it gives one, else the mean sample
            (smoothed by ``mean_smoothing_sigma``);
            ``[follow-up, std of the samples]`` (B, 2, ...) when ``return_uncertainty`` is set.
        """
        followup = self.direct_prediction(inputs, network, context, weeks)
        if followup is None or self.return_uncertainty:
            out = self.sample(inputs, network, context, weeks=weeks)
            followup = self.smooth_mean(out.mean) if followup is None else followup
            if self.return_uncertainty:
                followup = torch.cat([followup, out.std], dim=1)
        return _like_inputs(followup, inputs)

    def direct_prediction(
        self, inputs: torch.Tensor, network: Callable, context: torch.Tensor | None,
        weeks: torch.Tensor | float | None = None,
    ) -> torch.Tensor | None:
        """A follow-up computed without sampling, or ``None`` to return the mean of the samples (the default).

        Args:
            inputs: initial scans y0, (B, 1, D, H, W).
            network: the denoiser.
            context: text token features (B, L, D) or ``None``.
            weeks: interval to the follow-up or ``None``.
        """
        return None


PREDICTIONS = ("mean", "sample")


class ResidualShiftInferer(DiffusionSamplingInferer):
    """Residual-shift prediction from the initial scan over the whole volume: the mean, or samples.

    Two products (docs/README.md, "Mean and samples"):

    - ``prediction="mean"`` (default): the conditional-mean follow-up E[x0 | y0, text], one network
      call at t = T with x_T at the prior's mean y0 (``predict_mean``). It is what PSNR/SSIM and the
      classifier score: the mean minimises the squared error, a sample pays for its own variance.
    - ``prediction="sample"``: the mean of ``num_samples`` posterior samples (T reverse steps each).

    With ``return_uncertainty`` either mode also draws ``num_samples`` posterior samples and returns
    their voxel-wise standard deviation as a second channel. Either mean is Gaussian-smoothed by
    ``mean_smoothing_sigma``: the conditional mean holds none of y0's voxel noise (the follow-up's
    noise is independent of it), which a residual network (x0 = y0 + change) only partly cancels
    (docs/README.md, "Smoothing the mean prediction").

    Args:
        scheduler: the ``ResidualShiftScheduler`` the network was trained with.
        prediction: ``"mean"`` or ``"sample"``.
        kwargs: see ``DiffusionSamplingInferer``.
    """

    def __init__(self, scheduler: ResidualShiftScheduler, prediction: str = "mean", **kwargs) -> None:
        super().__init__(scheduler, **kwargs)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")
        self.prediction = prediction

    def prior(self, y0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_T = y0 + kappa sqrt(eta_T) noise: sampling starts at the initial scan (arguments as in the base class)."""
        return self.scheduler.prior_sample(y0, noise)

    def model_input(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        """x_t scaled as the scheduler scales it in training (arguments as in the base class)."""
        return self.scheduler.scale_model_input(x_t, timestep)

    @torch.inference_mode()
    def predict_mean(
        self, inputs: torch.Tensor, network: Callable, context: torch.Tensor | None = None,
        weeks: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """The conditional-mean follow-up: f(x_T = y0, y0, T), one sliding-window pass per case.

        x_T ~ N(x0 + eta_T e0, kappa^2 eta_T I) (ResShift Eq. 2) has mean y0 - (1 - eta_T) e0 ~ y0;
        the network is trained on this exact input (``ResidualShiftPrepareBatch``'s ``mean_fraction``),
        where the squared loss makes its output the conditional mean of x0 given y0 and the text.
        The input is y0 itself, not x0 + eta_T e0, which would leak (1 - eta_T) of the follow-up.
        The windows are windows of y0 and each gets ``custom.networks.mean_prediction_input``, so
        this is the sliding window over ``MeanPredictionUNet``'s image-to-image call, for any denoiser.

        Args:
            inputs: initial scans y0, (B, 1, D, H, W).
            network: the denoiser.
            context: text token features (B, L, D) or ``None``.
            weeks: interval to the follow-up, one per case or one for all; ``None`` reads the metadata.
        """
        context = self._context(inputs, context)
        weeks = self._weeks(inputs, weeks)
        y0 = plain_tensor(inputs)
        # MeanPredictionUNet's numbers: the step of t = T and the factor model_input applies to x_t there
        t = self.scheduler.num_train_timesteps - 1
        scale = float(self.model_input(torch.ones(1), t))
        mean = torch.cat([
            self.window(y0[b : b + 1], _WindowNetwork(network, t, None if context is None else context[b : b + 1],
                                                      self.autocast_dtype, self.channels_last, scale,
                                                      None if weeks is None else weeks[b : b + 1]))
            for b in range(y0.shape[0])
        ])
        return self.smooth_mean(mean)

    def direct_prediction(
        self, inputs: torch.Tensor, network: Callable, context: torch.Tensor | None,
        weeks: torch.Tensor | float | None = None,
    ) -> torch.Tensor | None:
        """The mean prediction in ``"mean"`` mode; ``None`` (the mean of the samples) in ``"sample"`` mode (arguments
        as in the base class)."""
        return self.predict_mean(inputs, network, context, weeks) if self.prediction == "mean" else None
