"""Image-similarity metrics restricted to a region (the lungs, or where the real scans changed).

PSNR and SSIM are the paper's metrics (CIResDiff, Sec. 3.2). Computed over the whole grid they
are dominated by the background outside the lungs, which every method reproduces trivially, so
the bundle reports them inside a region mask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.metrics.regression import compute_ssim_and_cs

from custom.geometry import MAX_SMOOTHING_SIGMA, gaussian_smooth

logger = logging.getLogger(__name__)


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) or a single decollated (1, D, H, W) image as a float (B, 1, D, H, W) tensor."""
    t = torch.as_tensor(t).float()
    return t if t.ndim == 5 else t[None]


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio inside ``mask``, one value per batch item.

    Args:
        pred: predicted images, (B, 1, D, H, W) or (1, D, H, W).
        target: reference images of the same shape.
        mask: region where the error is measured, same spatial shape; non-zero means inside.
        data_range: intensity range of the images (1 for the bundle's [0, 1] scale).
    """
    pred, target, mask = _as_batch(pred), _as_batch(target), _as_batch(mask) > 0
    if not bool(mask.flatten(1).any(1).all()):
        raise ValueError("PSNR needs a non-empty region mask for every image.")
    sq = ((pred - target) ** 2) * mask
    mse = sq.flatten(1).sum(1) / mask.flatten(1).sum(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def masked_ensemble_crps(samples: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """The fair continuous ranked probability score of an ensemble, per voxel, averaged inside ``mask``.

    CRPS = E|S - y| - E|S - S'| / 2 for S, S' independent draws of the forecast (Gneiting & Raftery,
    JASA 2007, Eq. 21), with the fair ensemble estimate of the second term, sum over i != j of
    |s_i - s_j| / (2 n (n - 1)) (Ferro, QJRMS 2014), so that ensembles of any size score alike in
    expectation. A proper score: it rewards samples whose spread matches the error, and for one
    member it is the absolute error of a point forecast. Lower is better, in image units.

    Args:
        samples: the ensemble, (n, 1, D, H, W) or (n, D, H, W).
        target: the observed image, (1, D, H, W) or (D, H, W).
        mask: where to score, same spatial shape as ``target``; non-zero means inside.
    """
    n = samples.shape[0]
    inside = torch.as_tensor(mask).reshape(target.shape) > 0
    if not bool(inside.any()):
        raise ValueError("CRPS needs a non-empty region mask.")
    members = samples.reshape(n, *target.shape)[:, inside].float()
    observed = torch.as_tensor(target)[inside].float()
    skill = (members - observed).abs().mean(0)
    spread = torch.zeros_like(skill)
    for i in range(n):
        for j in range(i + 1, n):
            spread += (members[i] - members[j]).abs()
    # each pair counted once above, so the sum over i != j is twice it
    spread = spread / (n * (n - 1)) if n > 1 else spread
    return float((skill - spread).mean())


def masked_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    data_range: float = 1.0,
    kernel_size: int = 7,
    kernel_sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity averaged over the voxels of ``mask``, one value per batch item.

    The local SSIM map (Wang et al. 2004, Gaussian window) is computed on the whole image, so each
    window sees its real neighbourhood, and only then averaged inside the region.

    Args:
        pred: predicted images, (B, 1, D, H, W) or (1, D, H, W).
        target: reference images of the same shape.
        mask: region where SSIM is averaged, same spatial shape; non-zero means inside.
        data_range: intensity range of the images.
        kernel_size: side of the Gaussian window in voxels (odd).
        kernel_sigma: standard deviation of the Gaussian window in voxels.
    """
    pred, target, mask = _as_batch(pred), _as_batch(target), _as_batch(mask) > 0
    ssim_map, _ = compute_ssim_and_cs(
        pred, target, spatial_dims=3, kernel_size=[kernel_size] * 3, kernel_sigma=[kernel_sigma] * 3,
        data_range=data_range,
    )
    # The map comes from a 'valid' convolution: crop the mask by half a window on each side.
    r = kernel_size // 2
    inner = mask[:, :, r:-r, r:-r, r:-r]
    if not bool(inner.flatten(1).any(1).all()):
        raise ValueError("SSIM needs a region mask that reaches further than half a window from the border.")
    return (ssim_map * inner).flatten(1).sum(1) / inner.flatten(1).sum(1)


def lung_psnr_gain(
    pred: torch.Tensor, target: torch.Tensor, lungs: torch.Tensor, initial: torch.Tensor
) -> torch.Tensor:
    """Paired PSNR gain over the identity baseline in the lungs: PSNR(pred) - PSNR(initial), in dB, per batch item.

    Identity (follow-up := initial scan) is the bar a prediction must clear; this is the score
    that picks the best checkpoint and gates ``model.pt`` (positive = better than copying).

    Args:
        pred: predicted follow-ups, (B, 1, D, H, W) or (1, D, H, W).
        target: real follow-ups of the same shape.
        lungs: lung labels or mask (undilated), same spatial shape.
        initial: the initial scans.
    """
    return masked_psnr(pred, target, lungs) - masked_psnr(initial, target, lungs)


class MaskedImageMetric(Metric):
    """Ignite metric averaging a region-restricted image metric over the evaluated cases.

    The per-case values are also put into ``engine.state.metric_details[name]`` as MONAI's
    metric handlers do, so ``monai.handlers.MetricsSaver`` can write them to a per-case CSV.

    Args:
        metric_fn: ``masked_psnr``, ``masked_ssim`` (functions of pred, target, mask) or ``lung_psnr_gain``
            (pred, target, lungs, initial): it is called with one item of each sequence.
        output_transform: maps the engine output to sequences of predictions, targets, masks (and
            whatever further arguments ``metric_fn`` takes).
        name: key under which the per-case values are stored in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        metric_fn: Callable[..., torch.Tensor],
        output_transform: Callable = lambda x: x,
        name: str | None = None,
    ) -> None:
        self.metric_fn = metric_fn
        self.name = name
        self._values: list[torch.Tensor] = []
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._values = []

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        # Ignite's default expects (y_pred, y) pairs; this metric takes further items (the mask, ...).
        self.update(self._output_transform(engine.state.output))

    def update(self, output: Sequence) -> None:
        for items in zip(*output):
            self._values.append(self.metric_fn(*(torch.as_tensor(i).detach().cpu() for i in items)).reshape(-1))

    def compute(self) -> float:
        if not self._values:
            raise RuntimeError("MaskedImageMetric was computed before any case was evaluated.")
        return float(torch.cat(self._values).mean())

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        if not hasattr(engine.state, "metric_details"):
            engine.state.metric_details = {}
        engine.state.metric_details[self.name or name] = torch.cat(self._values).reshape(-1, 1)


class SmoothedGainMetric(Metric):
    """The paired lung-PSNR gain over identity of the prediction at its best Gaussian smoothing; that sigma too.

    The mean prediction's smoothing (``ResidualShiftInferer``'s ``mean_smoothing_sigma``) removes what
    is left of the initial scan's voxel noise, which the conditional mean holds none of; how much is
    left depends on the weights, so it is chosen where the weights are chosen: on the whole validation
    fold, at every validation. Each case is scored at every candidate sigma (``lung_psnr_gain`` of the
    filtered prediction, the inferer's own ``custom.geometry.gaussian_smooth``); the metric is the
    largest mean gain over the fold and ``best_sigma`` the smallest sigma that reaches it, which
    ``custom.checkpoints.BestModelSaver`` writes beside the weights it saves.

    Args:
        sigmas: candidate sigmas in voxels, 0 (unsmoothed) included or not.
        output_transform: maps the engine output to sequences of predictions (unmasked: zeros outside
            the region would be pulled into the border of the lungs), targets, lungs and initial scans.
        sigma_name: key of ``engine.state.metrics`` that receives the chosen sigma.
    """

    def __init__(self, sigmas: Sequence[float], output_transform: Callable = lambda x: x,
                 sigma_name: str = "val_mean_smoothing_sigma") -> None:
        sigmas = sorted(float(s) for s in sigmas)
        if not sigmas or sigmas[0] < 0.0 or sigmas[-1] > MAX_SMOOTHING_SIGMA:
            raise ValueError(f"sigmas must be a non-empty list of voxel sigmas in [0, {MAX_SMOOTHING_SIGMA:g}], "
                             f"got {sigmas}.")
        self.sigmas = sigmas
        self.sigma_name = sigma_name
        self._gains: list[torch.Tensor] = []
        self.best_sigma: float | None = None
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._gains = []
        self.best_sigma = None

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        self.update(self._output_transform(engine.state.output))

    def update(self, output: Sequence) -> None:
        for items in zip(*output):
            pred, target, lungs, initial = (torch.as_tensor(i).detach().cpu().float() for i in items)
            self._gains.append(torch.cat([lung_psnr_gain(gaussian_smooth(pred, s), target, lungs, initial)
                                          for s in self.sigmas]))

    def gains(self) -> torch.Tensor:
        """Mean gain over the cases for each candidate sigma (dB, in the order of ``sigmas``)."""
        if not self._gains:
            raise RuntimeError("SmoothedGainMetric was computed before any case was evaluated.")
        return torch.stack(self._gains).mean(0)

    def compute(self) -> float:
        gains = self.gains()
        best = int(torch.argmax(gains))  # the first maximum: the least smoothing among ties
        self.best_sigma = self.sigmas[best]
        return float(gains[best])

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        engine.state.metrics[self.sigma_name] = self.best_sigma
        scores = ", ".join(f"{s:g} {g:+.3f} dB" for s, g in zip(self.sigmas, self.gains().tolist()))
        logger.info(f"{name} by smoothing sigma: {scores} (chosen: {self.best_sigma:g})")
