"""Inference outputs: the generated follow-up in the initial scan's space, change and uncertainty maps,
progression probability, and the files a person opens.

``configs/inference.json`` runs: preprocessing (load, segment, cut the lung region onto the
model grid) -> ``ResidualShiftInferer`` -> ``FollowupOutputsd`` (this module) -> ``InferenceWriter``.
Under MONAI Label (``post_transforms``) ``MonaiLabelResultd`` takes the writer's place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import MapTransform

from custom.classifier import pair_input
from custom.clinical.text import RecordError, read_lung_function
from custom.constants import HU_WINDOW
from custom.figures import save_comparison_figure, save_fibrosis_figure
from custom.geometry import denormalize, resample, voxel_spacing
from custom.io import check_output_dir, write_json, write_nifti
from custom.progression import ShippedForecaster, check_weeks

logger = logging.getLogger(__name__)


def _case_id(path: Path) -> str:
    """The case's name: the file name without its extension, or the folder's for generic names."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.parent.name if name in ("initial", "image", "ct") else name


def input_cases(
    input: str | os.PathLike, record: Mapping | None = None, records_csv: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Cases to predict: one CT (file or DICOM folder), or every CT in a folder of them.

    A case is skipped when its outputs already exist in ``output_dir`` (re-running resumes).

    Args:
        input: a NIfTI / NRRD / MHA file, a DICOM series folder, or a folder of those.
        record: the lung-function record of a single case.
        records_csv: OSIC-style CSV with records by patient id (the file or folder name).
        output_dir: where finished cases have a ``followup.nii.gz``.
    """
    path = Path(input)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    single = path.is_file() or any(p.suffix.lower() == ".dcm" for p in path.iterdir() if p.is_file())
    sources = [path] if single else sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if not sources:
        raise FileNotFoundError(f"no CT in {path}")
    table = read_lung_function(records_csv) if records_csv else {}
    cases = []
    for source in sources:
        pid = _case_id(source)
        if output_dir is not None and (Path(output_dir) / pid / "followup.nii.gz").is_file():
            logger.info(f"{pid}: outputs exist, skipped")
            continue
        rec = record if single and record is not None else table.get(pid, {}).get("record")
        cases.append({"image": str(source), "patient": pid, "record": rec})
    return cases


def lungs_inside_grid(
    lungs: np.ndarray, lungs_affine: np.ndarray, grid_shape: Sequence[int], grid_affine: np.ndarray
) -> float:
    """Share of the lung voxels whose centres fall inside a grid (by physical position).

    Args:
        lungs: lung labels on the scan's own grid.
        lungs_affine: their voxel-to-RAS affine.
        grid_shape: voxels of the model's grid.
        grid_affine: its voxel-to-RAS affine.
    """
    idx = np.argwhere(lungs > 0)
    if idx.size == 0:
        return 0.0
    mapping = np.linalg.inv(grid_affine) @ lungs_affine
    grid_idx = idx @ mapping[:3, :3].T + mapping[:3, 3]
    inside = np.all((grid_idx > -0.5) & (grid_idx < np.asarray(grid_shape) - 0.5), axis=1)
    return float(inside.mean())


class GridCoverageCheckd(MapTransform):
    """Refuse a case whose lungs the model's grid does not hold, instead of silently predicting part of them.

    The share of the lung voxels (undilated, where the disease is scored) inside the grid must
    reach ``min_inside``; otherwise the case is refused with a message naming the case, the share
    and the setting to change. With ``allow_cropped`` the case goes on as a declared crop. Every
    case carries ``coverage`` (the shares, whether the lungs touch the border of the scan, and
    whether the prediction is cropped) into ``prediction.json``; a crop, or lungs cut by the scan's
    field of view (as in the synthetic cohort's apices: what lies outside the scan cannot be
    predicted, the rest is), is also named in the figure's title and logged as a warning.

    Args:
        keys: key of the region mask on the model's grid (its affine and shape define the grid).
        lungs_key: key of the lung labels on the scan's own grid (before resampling).
        min_inside: smallest share of the lung voxels the grid must hold.
        allow_cropped: predict anyway and say so, instead of refusing.
    """

    def __init__(self, keys: Hashable = "mask", lungs_key: str = "image_lungs", min_inside: float = 0.98,
                 allow_cropped: bool = False) -> None:
        super().__init__(keys)
        self.lungs_key, self.min_inside, self.allow_cropped = lungs_key, float(min_inside), bool(allow_cropped)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        lungs_image = d[self.lungs_key]
        lungs = np.asarray(lungs_image[0]) > 0
        for key in self.key_iterator(d):
            region = d[key]
            case = d.get("patient", region.meta.get("filename_or_obj", "the case"))
            inside = lungs_inside_grid(lungs, np.asarray(lungs_image.affine), region.shape[1:],
                                       np.asarray(region.affine))
            cut = bool(lungs[[0, -1]].any() or lungs[:, [0, -1]].any() or lungs[:, :, [0, -1]].any())
            note = {"lungs_inside_grid": round(inside, 4),
                    "region_inside_grid": round(float(region.meta["region_inside_grid"]), 4),
                    "lungs_cut_by_scan": cut, "cropped": inside < self.min_inside}
            if inside < self.min_inside:
                grid = "x".join(str(n) for n in region.shape[1:])
                spacing = float(np.linalg.norm(np.asarray(region.affine)[:3, 0]))
                message = (f"{case}: only {100 * inside:.1f} % of the lungs fit the {grid} grid of {spacing:g} mm "
                           f"voxels (at least {100 * self.min_inside:.0f} % needed): set a larger 'grid' "
                           "(custom/grid.py)")
                if not self.allow_cropped:
                    raise ValueError(message + ", or 'allow_cropped' to predict the part that fits "
                                     "(the outputs then say so).")
                logger.warning(message + "; predicting the part that fits ('allow_cropped').")
            if cut:
                logger.warning(f"{case}: the lungs touch the border of the scan; what lies outside its field of view "
                               "is not predicted")
            d["coverage"] = note
        return d


class FollowupOutputsd(MapTransform):
    """From the model's output on its grid to outputs in the initial scan's space, in HU.

    ``pred`` (1 channel: the generated follow-up in [0, 1]; 2 channels: mean and standard deviation
    over samples) becomes ``pred`` (the whole follow-up CT: generated inside the lung region, the
    initial scan elsewhere), ``change`` (generated minus initial, HU) and, for two channels,
    ``uncertainty`` (standard deviation in HU, 0 outside the region). ``pred_grid`` keeps the
    generated follow-up on the model grid for the figure and the classifier.

    Args:
        keys: key of the network output (``pred``).
        source_key: key of the initial scan in HU on its own grid.
        mask_key: key of the lung-region mask on the model grid.
        window: HU window of the normalisation.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable = "pred", source_key: str = "image_hu",
                 mask_key: str = "mask", window: Sequence[float] = HU_WINDOW) -> None:
        super().__init__(keys)
        self.source_key, self.mask_key, self.window = source_key, mask_key, tuple(window)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        key = self.first_key(d)
        source = d[self.source_key]
        source_affine, shape = np.asarray(source.affine), tuple(source.shape[1:])
        initial = np.asarray(source[0], dtype=np.float32)
        grid_affine = np.asarray(d[self.mask_key].affine)
        mask = np.asarray(d[self.mask_key][0], dtype=np.float32)
        region = resample(mask, grid_affine, source_affine, shape, 1, 0.0) > 0.5
        pred = torch.as_tensor(d[key]).detach().cpu().float().numpy()
        generated = denormalize(resample(pred[0], grid_affine, source_affine, shape, 1, 0.0), self.window)
        followup = np.where(region, generated, initial).astype(np.float32)
        meta = {"filename_or_obj": source.meta.get("filename_or_obj", "")}
        d["pred_grid"] = MetaTensor(pred[:1], affine=grid_affine)
        d[key] = MetaTensor(followup[None], affine=source_affine, meta=meta)
        d["change"] = MetaTensor((followup - initial)[None], affine=source_affine, meta=meta)
        if pred.shape[0] > 1:
            width = self.window[1] - self.window[0]
            std = resample(pred[1], grid_affine, source_affine, shape, 1, 0.0) * width
            d["uncertainty"] = MetaTensor(np.where(region, std, 0.0)[None].astype(np.float32), affine=source_affine,
                                          meta=meta)
            d["uncertainty_grid"] = MetaTensor(pred[1:2], affine=grid_affine)
        return d


class ProgressionProbabilityd(MapTransform):
    """Probability of IPF progression from the diagnostic classifier on the (initial, generated) pair.

    Args:
        classifier: the trained classifier (input of :func:`custom.classifier.pair_input`, 2 classes), or ``None``.
        image_key: key of the initial scan on the model grid.
        pred_key: key of the generated follow-up on the model grid.
        input_size: size the pair is resized to (the classifier's training size).
    """

    def __init__(self, classifier: torch.nn.Module | None, image_key: str = "image", pred_key: str = "pred_grid",
                 input_size: Sequence[int] = (64, 64, 64)) -> None:
        super().__init__([image_key, pred_key])
        self.classifier, self.image_key, self.pred_key = classifier, image_key, pred_key
        self.input_size = tuple(input_size)

    @torch.inference_mode()
    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.classifier is None:
            return d
        device = next(self.classifier.parameters()).device
        pair = pair_input(torch.as_tensor(d[self.image_key]).cpu(), torch.as_tensor(d[self.pred_key]).cpu(),
                          self.input_size)
        self.classifier.eval()
        d["progression_probability"] = float(torch.softmax(self.classifier(pair[None].to(device)).float(), dim=1)[0, 1])
        return d


class FVCForecastd(MapTransform):
    """The FVC forecast ``weeks`` after the initial scan, with its SD and the progression probability.

    Runs in preprocessing, where the case still has its record (``custom.progression.ShippedForecaster``
    on the record and the interval; see ``custom/progression.py`` for the model and the OSIC score
    it is fitted for). Adds ``fvc_forecast`` (``weeks``, ``fvc_ml``, ``sd_ml``, ``decline_percent``,
    ``progression_probability``); a case without a record, or without a forecaster, gets none.

    Args:
        forecaster: the fitted forecaster, or ``None``.
        weeks: interval to the follow-up the forecast is for (1 to 260 weeks).
        keys: key of the record.
        id_key: key of the patient id, for error messages.
    """

    def __init__(self, forecaster: ShippedForecaster | None, weeks: float = 52.0, keys: Hashable = "record",
                 id_key: str = "patient") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.weeks = check_weeks(weeks)
        if forecaster is not None and forecaster.needs_scans:
            raise ValueError("the forecaster uses scan features, which inference does not compute before the "
                             "prediction; fit it on the record and interval (scripts/fit_forecaster.py)")
        self.forecaster, self.id_key = forecaster, id_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        key = self.first_key(d)
        record = d.get(key) if key != () else None
        if self.forecaster is None or not record:
            return d
        try:
            d["fvc_forecast"] = self.forecaster.forecast(record, self.weeks)
        except RecordError as e:
            raise RecordError(f"{d.get(self.id_key, 'unknown patient')}: {e} (or set forecaster_path to null to "
                              "predict without the FVC forecast)") from None
        return d


def load_forecaster(path: str | os.PathLike | None) -> ShippedForecaster | None:
    """The shipped FVC forecaster, or ``None`` (with a log line) when there is none.

    Args:
        path: forecaster JSON (``models/forecaster.json``, written by ``scripts/fit_forecaster.py``);
            ``None``: predict without the FVC forecast.
    """
    if path is None:
        return None
    if not Path(path).is_file():
        logger.warning(f"no FVC forecaster at {path}: no FVC forecast is made (scripts/fit_forecaster.py fits one)")
        return None
    return ShippedForecaster.load(path)


def load_classifier(network: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module | None:
    """The diagnostic classifier with its weights, or ``None`` (with a log line) when none was trained.

    Args:
        network: the classifier architecture.
        path: weights file (``models/classifier/model.pt``: in a folder of its own, because MONAI Label offers
            every ``models/*.pt`` as a choice of weights for ``network_def``).
    """
    from custom.checkpoints import load_network_weights

    if not Path(path).is_file():
        logger.warning(f"no classifier weights at {path}: the progression probability is not computed "
                       "(train it with configs/train_classifier.json)")
        return None
    return load_network_weights(network, path)


def _plain_coverage(coverage: Mapping | None) -> dict | None:
    """``GridCoverageCheckd``'s note as plain JSON values (the data loader batches them)."""
    if coverage is None:
        return None
    return {key: (float if key.endswith("_grid") else bool)(np.asarray(value).reshape(-1)[0])
            for key, value in coverage.items()}


def _title_note(coverage: Mapping | None) -> str:
    """What the figure's title must say about the coverage: a declared crop, or lungs cut by the scan."""
    if coverage and coverage["cropped"]:
        return f"CROPPED PREDICTION ({100 * coverage['lungs_inside_grid']:.0f} % of the lungs in the grid) - "
    if coverage and coverage["lungs_cut_by_scan"]:
        return "(lungs cut by the scan's field of view) "
    return ""


def _fibrosis_title(patient: str, summary: Mapping | None) -> str:
    """The fibrosis picture's title: the HAA shares of the lungs at baseline and predicted follow-up."""
    if not summary:
        return patient
    return (f"{patient}: high-attenuation area {summary['haa_percent_initial']:.1f} % of the lungs at baseline, "
            f"{summary['haa_percent_followup']:.1f} % predicted at follow-up "
            f"({summary['new_fibrosis_ml']:.0f} ml predicted new fibrosis)")


class InferenceWriter:
    """Ignite handler writing each case's outputs atomically into ``<output_dir>/<patient>/``.

    Files: ``followup.nii.gz`` (generated follow-up, HU, initial scan's space), ``change.nii.gz``,
    ``fibrosis.nii.gz`` (label map of ``custom.fibrosis.FIBROSIS_LABELS``) and its picture
    ``fibrosis.png``, ``uncertainty.nii.gz``
    (when several samples were drawn), ``figure.png`` (Fig. 3-style) and ``prediction.json`` (text
    used, progression probability, HAA shares of the lungs, and under ``files`` the paths, by file
    name: ``followup``, ``change``, ``fibrosis``, ...).

    Args:
        output_dir: root folder of the outputs.
        prediction: what ``followup.nii.gz`` is (``"mean"``: the mean prediction; ``"sample"``: the
            mean of posterior samples), written into ``prediction.json``.
        num_samples: posterior samples behind the uncertainty map (1: none).
        sample_output_step: the reverse step whose x0 prediction each sample is (1: the whole chain), said in
            ``prediction.json``.
        mean_smoothing_sigma: the inferer's smoothing of the returned mean (voxels), said in ``prediction.json``.
    """

    def __init__(self, output_dir: str | os.PathLike, prediction: str = "mean", num_samples: int = 1,
                 sample_output_step: int = 1, mean_smoothing_sigma: float = 0.0) -> None:
        self.output_dir = check_output_dir(output_dir)
        self.prediction, self.num_samples = prediction, int(num_samples)
        self.sample_output_step = int(sample_output_step)
        self.mean_smoothing_sigma = float(mean_smoothing_sigma)
        self.written: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            self.write_case({**item, **out})

    def write_case(self, d: Mapping) -> dict:
        pid = str(d.get("patient", "case"))
        folder = self.output_dir / pid
        files = {}
        for key, name, dtype in (("change", "change", np.float32), ("uncertainty", "uncertainty", np.float32),
                                 ("fibrosis", "fibrosis", np.uint8), ("pred", "followup", np.float32)):
            if key in d:
                image = d[key]
                array = np.asarray(image[0], dtype=dtype)
                files[name] = str(write_nifti(folder / f"{name}.nii.gz", array, np.asarray(image.affine)))
        uncertainty = np.asarray(d["uncertainty_grid"][0]) if "uncertainty_grid" in d else None
        coverage = _plain_coverage(d.get("coverage"))
        figure = save_comparison_figure(
            folder / "figure.png", np.asarray(d["image"][0]), np.asarray(d["pred_grid"][0]), uncertainty=uncertainty,
            mask=np.asarray(d["mask"][0]), title=_title_note(coverage) + f"{pid}: {d.get('text', '')}",
        )
        if "fibrosis" in d:
            source = d["image_hu"]
            files["fibrosis_figure"] = str(save_fibrosis_figure(
                folder / "fibrosis.png", np.asarray(source[0]), np.asarray(d["pred"][0]), np.asarray(d["fibrosis"][0]),
                voxel_spacing(np.asarray(source.affine)), title=_fibrosis_title(pid, d.get("fibrosis_summary")),
            ))
        summary = {"patient": pid, "text": d.get("text"), "weeks": d.get("weeks"),
                   "progression_probability": d.get("progression_probability"), "fvc_forecast": d.get("fvc_forecast"),
                   "prediction": {
                       "mean": "mean prediction",
                       "sample": f"mean of {self.num_samples} posterior samples",
                   }.get(self.prediction, self.prediction) + (
                       f", Gaussian-smoothed (sigma {self.mean_smoothing_sigma:g} voxel)"
                       if self.mean_smoothing_sigma > 0 else ""),
                   "uncertainty_samples": self.num_samples if "uncertainty" in d else 0,
                   "samples_are": None if self.num_samples == 1 and self.prediction == "mean" else (
                       "x_0 of the whole chain" if self.sample_output_step == 1 else
                       f"the x0 prediction at reverse step {self.sample_output_step} (denoised)"),
                   "fibrosis": d.get("fibrosis_summary"),
                   "coverage": coverage,
                   "files": {**files, "figure": str(figure)}}
        write_json(folder / "prediction.json", summary)
        self.written.append(summary)
        logger.info(f"{pid}: wrote {folder}")
        return summary


class MonaiLabelResultd(MapTransform):
    """The case as MONAI Label serves it: the fibrosis label map as the result, the bundle's outputs beside it.

    The last of ``inference.json``'s ``post_transforms``, which MONAI Label's bundle infer task
    reads instead of ``postprocessing`` (it reads both keys and keeps the last present; the bundle's
    own workflows use ``postprocessing`` and ``InferenceWriter``). MONAI Label then writes
    ``d["pred"]`` as the result image (its ``Restored`` and ``Writer``, which takes an (x, y, z)
    array) and answers with ``d["result"]``. So this transform:

    - writes the case's outputs with ``writer.write_case`` as the bundle's inference does
      (``<output_dir>/<case>/followup.nii.gz``, ``fibrosis.nii.gz``, ``change.nii.gz``, the figures
      and ``prediction.json``, each atomically): the generated follow-up CT lies beside the result;
    - puts the label map (``custom.fibrosis.FIBROSIS_LABELS``, uint8, initial scan's space) in
      ``pred`` without its channel, and keeps the follow-up CT under ``followup``;
    - sets ``result`` to ``prediction.json``'s content: text used, progression probability, HAA
      shares of the lungs at baseline and predicted follow-up, new fibrosis in ml, coverage, paths.

    Args:
        writer: the ``InferenceWriter`` of the config (its ``output_dir``).
        keys: key of the label map (``FibrosisMapd``'s ``fibrosis``).
        pred_key: key MONAI Label writes as the result (``pred``; the follow-up CT until this transform).
        result_key: key of the JSON answer (MONAI Label's ``result``).
        followup_key: key receiving the follow-up CT.
        source_key: key of the initial scan in HU, whose file name names the case without a ``patient``.
    """

    def __init__(self, writer: InferenceWriter, keys: Hashable = "fibrosis", pred_key: str = "pred",
                 result_key: str = "result", followup_key: str = "followup", source_key: str = "image_hu") -> None:
        super().__init__(keys)
        self.writer, self.pred_key, self.result_key = writer, pred_key, result_key
        self.followup_key, self.source_key = followup_key, source_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if "patient" not in d:
            d["patient"] = _case_id(Path(str(d[self.source_key].meta.get("filename_or_obj", "case"))))
        summary = self.writer.write_case(d)
        label = d[self.first_key(d)]
        d[self.followup_key] = d[self.pred_key]
        d[self.pred_key] = MetaTensor(label[0].as_tensor().to(torch.uint8), affine=label.affine,
                                      meta={"filename_or_obj": label.meta.get("filename_or_obj", "")})
        d[self.result_key] = summary
        return d
