"""Progression as the clinic and the OSIC competition score it: an FVC forecast with a confidence.

Progression of IPF is a relative decline of the forced vital capacity (FVC) of at least 10 % at the
follow-up (Raghu et al. 2022). A forecaster here predicts the follow-up FVC in ml with a standard
deviation, and is scored with the OSIC Pulmonary Fibrosis Progression competition's metric (Kaggle
2020), the modified Laplace log-likelihood of the true FVC::

    sigma' = max(sigma, 70 ml),  delta = min(|FVC_true - FVC_pred|, 1000 ml)
    score  = -sqrt(2) * delta / sigma' - ln(sqrt(2) * sigma')

averaged over patients (higher is better). It is the log-density of a Laplace distribution with
scale ``b = sigma / sqrt(2)`` (``-|x - mu| / b - ln(2 b)``), so the same forecast also gives the
probability of progression, ``P(FVC_followup <= 0.9 FVC_initial)``, from that distribution's CDF.

The forecasters share one form, a linear model of the FVC change on features of the patient (the
record, the interval, and for the image forecasters measurements of the two scans), with one
sigma fitted to the training patients' cross-validated residuals: for a fixed set of absolute
errors the score's mean is largest at ``sigma = sqrt(2) * mean(|error|)`` (set its derivative in
sigma to zero), which ``optimal_sigma`` returns. AUCs come with a patient-level bootstrap CI.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from custom.clinical.text import RecordError, validate_record
from custom.fibrosis import haa_summary, high_attenuation_area
from custom.io import write_json

SIGMA_MIN_ML = 70.0
"""The OSIC metric's lower clip of the predicted standard deviation."""
ERROR_MAX_ML = 1000.0
"""The OSIC metric's upper clip of the absolute error."""
PROGRESSION_DECLINE = 0.10
"""Relative FVC decline at the follow-up that defines progression."""


def laplace_log_likelihood(fvc_true: Sequence[float], fvc_pred: Sequence[float],
                           sigma: Sequence[float] | float) -> np.ndarray:
    """The OSIC modified Laplace log-likelihood of each patient (average it for the competition's score).

    Args:
        fvc_true: measured follow-up FVC (ml).
        fvc_pred: predicted follow-up FVC (ml).
        sigma: predicted standard deviation (ml), one per patient or one for all.
    """
    fvc_true, fvc_pred = np.asarray(fvc_true, dtype=float), np.asarray(fvc_pred, dtype=float)
    if fvc_true.shape != fvc_pred.shape:
        raise ValueError(f"{fvc_true.shape[0] if fvc_true.ndim else 1} true and "
                         f"{fvc_pred.shape[0] if fvc_pred.ndim else 1} predicted FVC values")
    sigma = np.maximum(np.broadcast_to(np.asarray(sigma, dtype=float), fvc_true.shape), SIGMA_MIN_ML)
    delta = np.minimum(np.abs(fvc_true - fvc_pred), ERROR_MAX_ML)
    return -np.sqrt(2.0) * delta / sigma - np.log(np.sqrt(2.0) * sigma)


def optimal_sigma(errors: Sequence[float]) -> float:
    """The one sigma that maximises the mean OSIC score for these errors: ``sqrt(2) * mean(|error|)``, clipped.

    Args:
        errors: forecast errors (ml) of the patients the sigma is fitted on.
    """
    delta = np.minimum(np.abs(np.asarray(errors, dtype=float)), ERROR_MAX_ML)
    return float(max(np.sqrt(2.0) * delta.mean(), SIGMA_MIN_ML))


def progression_labels(fvc_initial: Sequence[float], fvc_followup: Sequence[float],
                       decline: float = PROGRESSION_DECLINE) -> np.ndarray:
    """1 where the relative FVC decline between the scans is at least ``decline``.

    Args:
        fvc_initial: FVC at the initial scan (ml).
        fvc_followup: FVC at the follow-up (ml).
        decline: relative decline that counts as progression.
    """
    fvc_initial, fvc_followup = np.asarray(fvc_initial, dtype=float), np.asarray(fvc_followup, dtype=float)
    # the 1e-9 keeps a decline of exactly 10 % (FVC 2000 -> 1800) on the progression side despite rounding
    return ((fvc_initial - fvc_followup) / fvc_initial >= decline - 1e-9).astype(int)


def progression_probability(fvc_initial: Sequence[float], fvc_pred: Sequence[float], sigma: Sequence[float] | float,
                            decline: float = PROGRESSION_DECLINE) -> np.ndarray:
    """P(follow-up FVC <= (1 - decline) x initial FVC) under the forecast's Laplace distribution.

    Args:
        fvc_initial: FVC at the initial scan (ml).
        fvc_pred: predicted follow-up FVC (ml), the Laplace location.
        sigma: predicted standard deviation (ml); the Laplace scale is ``sigma / sqrt(2)``.
        decline: relative decline that counts as progression.
    """
    fvc_initial, fvc_pred = np.asarray(fvc_initial, dtype=float), np.asarray(fvc_pred, dtype=float)
    scale = np.maximum(np.asarray(sigma, dtype=float), SIGMA_MIN_ML) / np.sqrt(2.0)
    z = ((1.0 - decline) * fvc_initial - fvc_pred) / scale
    return np.where(z < 0, 0.5 * np.exp(np.minimum(z, 0.0)), 1.0 - 0.5 * np.exp(-np.maximum(z, 0.0)))


def forecast_from_declines(fvc_initial: float, declines: Sequence[float]) -> tuple[float, float, float]:
    """The forecast that maximises the expected OSIC score under a predictive distribution of the decline.

    The location is the median follow-up FVC (the minimiser of the expected absolute error), the
    sigma ``optimal_sigma`` of the errors about it; the progression probability is the share of
    the distribution at a decline of 10 % or more. Returns ``(fvc_ml, sigma_ml, probability)``.

    Args:
        fvc_initial: FVC at the initial scan (ml).
        declines: equally likely values of the relative decline at the follow-up.
    """
    declines = np.asarray(declines, dtype=float)
    fvc = fvc_initial * (1.0 - declines)
    location = float(np.median(fvc))
    probability = float((declines >= PROGRESSION_DECLINE - 1e-9).mean())
    return location, optimal_sigma(fvc - location), probability


def brier_score(labels: Sequence[int], probabilities: Sequence[float]) -> float:
    """Mean squared difference between the predicted probability and the 0/1 outcome.

    Args:
        labels: outcomes (0 or 1).
        probabilities: predicted probabilities of 1.
    """
    return float(np.mean((np.asarray(probabilities, dtype=float) - np.asarray(labels, dtype=float)) ** 2))


def bootstrap_ci(statistic: Callable[..., float], *arrays: Sequence, n_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(*arrays)`` over patients (the arrays are resampled together).

    A resample on which the statistic is undefined (it raises ``ValueError`` or is not finite, e.g.
    an AUC of one class only) is drawn again, so the CI always rests on ``n_resamples`` values.

    Args:
        statistic: function of the arrays, e.g. ``sklearn.metrics.roc_auc_score``.
        arrays: per-patient values, all of one length.
        n_resamples: bootstrap resamples.
        confidence: coverage of the interval.
        seed: seed of the resampling.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays of lengths {[len(a) for a in arrays]}: one value per patient in each")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    attempts = 0
    while len(values) < n_resamples:
        attempts += 1
        if attempts > 20 * n_resamples:
            raise ValueError("the statistic is undefined on almost every resample")
        index = rng.integers(0, n, n)
        with warnings.catch_warnings():
            # scikit-learn warns and returns NaN (older versions raise) for an AUC of one class
            warnings.simplefilter("ignore")
            try:
                value = float(statistic(*(a[index] for a in arrays)))
            except ValueError:
                continue
        if np.isfinite(value):
            values.append(value)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def auc_with_ci(labels: Sequence[int], scores: Sequence[float], n_resamples: int = 2000,
                seed: int = 0) -> dict[str, float]:
    """ROC AUC with its 95 % patient-level bootstrap CI.

    Args:
        labels: outcomes (0 or 1), both present.
        scores: predicted scores (higher = more likely 1).
        n_resamples: bootstrap resamples.
        seed: seed of the resampling.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    if len(set(labels.tolist())) != 2:
        raise ValueError(f"an AUC needs both outcomes; the labels hold only {sorted(set(labels.tolist()))}")
    low, high = bootstrap_ci(roc_auc_score, labels, scores, n_resamples=n_resamples, seed=seed)
    return {"auc": float(roc_auc_score(labels, scores)), "low": low, "high": high}


class FVCForecaster:
    """Follow-up FVC (ml) and its standard deviation from per-patient features: the no-decline, tabular and image rows.

    The mean is ``FVC_initial + ridge(features)``: the change is what is learnt (with no feature
    columns, the training patients' mean change; with ``no_change``, none: the no-decline
    baseline). Sigma is ``optimal_sigma`` of the training patients' residuals under K-fold
    cross-validation, so it is not fitted on residuals the ridge has seen.

    Args:
        alpha: ridge penalty on the standardised features.
        no_change: predict no change at all (the no-decline baseline); only sigma is fitted.
        folds: folds of the cross-validation that fits sigma.
    """

    def __init__(self, alpha: float = 1.0, no_change: bool = False, folds: int = 5) -> None:
        self.alpha, self.no_change, self.folds = alpha, no_change, folds
        self.sigma: float | None = None
        self.linear: dict[str, list[float] | float] | None = None

    def _linear(self, features: np.ndarray, change: np.ndarray) -> dict[str, list[float] | float]:
        """The change model as plain numbers: ``change = intercept + coef . (x - mean) / sd``."""
        n = features.shape[1]
        if self.no_change:
            return {"mean": [0.0] * n, "sd": [1.0] * n, "coef": [0.0] * n, "intercept": 0.0}
        if n == 0:
            return {"mean": [], "sd": [], "coef": [], "intercept": float(change.mean())}
        mean, sd = features.mean(0), features.std(0) + 1e-9
        ridge = Ridge(alpha=self.alpha).fit((features - mean) / sd, change)
        return {"mean": mean.tolist(), "sd": sd.tolist(), "coef": ridge.coef_.tolist(),
                "intercept": float(ridge.intercept_)}

    @staticmethod
    def _apply(linear: dict, features: np.ndarray) -> np.ndarray:
        mean, sd, coef = (np.asarray(linear[k], dtype=float) for k in ("mean", "sd", "coef"))
        return float(linear["intercept"]) + ((features - mean) / sd) @ coef

    def fit(self, features: np.ndarray, fvc_initial: Sequence[float], fvc_followup: Sequence[float]) -> FVCForecaster:
        """Fit the change model on all patients and sigma on its cross-validated residuals.

        Args:
            features: (patients, features) array; may have zero columns.
            fvc_initial: FVC at the initial scan (ml).
            fvc_followup: measured FVC at the follow-up (ml).
        """
        features = np.asarray(features, dtype=float).reshape(len(fvc_initial), -1)
        change = np.asarray(fvc_followup, dtype=float) - np.asarray(fvc_initial, dtype=float)
        if not np.isfinite(features).all() or not np.isfinite(change).all():
            raise ValueError("features and FVC values must be finite")
        residuals = np.empty_like(change)
        splits = KFold(n_splits=min(self.folds, len(change)), shuffle=True, random_state=0).split(features)
        for train, held in splits:
            residuals[held] = change[held] - self._apply(self._linear(features[train], change[train]), features[held])
        self.sigma = optimal_sigma(residuals)
        self.linear = self._linear(features, change)
        return self

    def predict(self, features: np.ndarray, fvc_initial: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted follow-up FVC (ml) and its standard deviation (ml) per patient.

        Args:
            features: (patients, features) array with the training's columns.
            fvc_initial: FVC at the initial scan (ml).
        """
        if self.sigma is None or self.linear is None:
            raise RuntimeError("fit the forecaster first")
        fvc_initial = np.asarray(fvc_initial, dtype=float)
        features = np.asarray(features, dtype=float).reshape(len(fvc_initial), -1)
        return fvc_initial + self._apply(self.linear, features), np.full(len(fvc_initial), self.sigma)


TABULAR_FEATURES = ("weeks", "FVC", "weeks_x_FVC", "Percent", "weeks_x_Percent", "Age", "male", "ex_smoker",
                    "current_smoker")
"""The record and the interval as the tabular forecaster's features (the decline grows with the interval)."""
SCAN_FEATURES = ("haa_percent_initial", "haa_percent_change", "lung_hu_change")
"""What the image forecasters add: the high-attenuation area at baseline, and its and the lungs' mean HU change."""


def tabular_features(record: dict, weeks: float) -> dict[str, float]:
    """The ``TABULAR_FEATURES`` of one patient.

    Args:
        record: the lung-function record at the initial scan (``FVC, Percent, Age, Sex, SmokingStatus``).
        weeks: weeks from the initial scan to the follow-up the forecast is for.
    """
    fields = validate_record(record)  # OSIC spellings and case normalised, ranges checked
    fvc, percent = float(fields["FVC"]), float(fields["Percent"])
    smoking = fields.get("SmokingStatus")
    return {"weeks": float(weeks), "FVC": fvc, "weeks_x_FVC": weeks * fvc / 52.0, "Percent": percent,
            "weeks_x_Percent": weeks * percent / 52.0, "Age": float(fields["Age"]),
            "male": float(fields.get("Sex") == "male"), "ex_smoker": float(smoking == "former smoker"),
            "current_smoker": float(smoking == "current smoker")}


def scan_features(initial_hu: np.ndarray, followup_hu: np.ndarray, lungs: np.ndarray,
                  spacing: Sequence[float]) -> dict[str, float]:
    """The ``SCAN_FEATURES`` of one (initial, follow-up) pair on one grid, measured inside the baseline lungs.

    Args:
        initial_hu: initial scan in HU (x, y, z).
        followup_hu: real or generated follow-up in HU, on the initial scan's grid (pre-registered).
        lungs: lung mask or labels of the initial scan on that grid.
        spacing: voxel size in mm.
    """
    lung = np.asarray(lungs) > 0
    if not lung.any():
        raise ValueError("the lung mask is empty: no scan features")
    haa = haa_summary(high_attenuation_area(initial_hu, lung, spacing),
                      high_attenuation_area(followup_hu, lung, spacing), lung, spacing)
    return {"haa_percent_initial": haa["haa_percent_initial"],
            "haa_percent_change": haa["haa_percent_followup"] - haa["haa_percent_initial"],
            "lung_hu_change": float(np.asarray(followup_hu)[lung].mean() - np.asarray(initial_hu)[lung].mean())}


MAX_WEEKS = 260.0
"""The longest interval a forecast is made for (5 years; the cohorts span 26-70 weeks)."""


def check_weeks(weeks: object) -> float:
    """The interval to the follow-up, in weeks, as a float; a clear error for anything else.

    Args:
        weeks: weeks from the initial scan to the follow-up asked for.
    """
    try:
        value = float(weeks)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"weeks must be a number of weeks to the follow-up, got {weeks!r}") from None
    if not math.isfinite(value) or not 1.0 <= value <= MAX_WEEKS:
        raise ValueError(f"weeks must be between 1 and {MAX_WEEKS:.0f} (weeks from the initial scan to the "
                         f"follow-up), got {weeks!r}")
    return value


class ShippedForecaster:
    """A fitted ``FVCForecaster`` with the names of its features, stored as JSON (plain numbers, no pickle).

    Args:
        forecaster: the fitted forecaster.
        features: names of its feature columns (``TABULAR_FEATURES``, then any ``SCAN_FEATURES``).
        provenance: what it was fitted on, for the model card and the outputs.
    """

    def __init__(self, forecaster: FVCForecaster, features: Sequence[str], provenance: str = "") -> None:
        unknown = [f for f in features if f not in TABULAR_FEATURES and f not in SCAN_FEATURES]
        if unknown:
            raise ValueError(f"unknown forecaster features {unknown}")
        self.forecaster, self.features, self.provenance = forecaster, list(features), provenance

    @property
    def needs_scans(self) -> bool:
        return any(f in SCAN_FEATURES for f in self.features)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the forecaster as JSON (atomically)."""
        return write_json(path, {"features": self.features, "sigma_ml": self.forecaster.sigma,
                                 "linear": self.forecaster.linear, "provenance": self.provenance})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShippedForecaster:
        """Read a forecaster written by ``save``; a clear error for a missing or malformed file."""
        path = Path(path)
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            forecaster = FVCForecaster()
            forecaster.sigma, forecaster.linear = float(content["sigma_ml"]), dict(content["linear"])
            if not len(content["features"]) == len(forecaster.linear["coef"]) == len(forecaster.linear["mean"]):
                raise ValueError("feature names and coefficients differ in number")
            return cls(forecaster, content["features"], content.get("provenance", ""))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a forecaster written by ShippedForecaster.save ({e})") from e

    def forecast(self, record: Mapping, weeks: float, scans: Mapping[str, float] | None = None) -> dict[str, float]:
        """Follow-up FVC (ml), its SD and the progression probability ``weeks`` after the initial scan.

        Args:
            record: the lung-function record at the initial scan (needs ``FVC``, ``Percent``, ``Age``).
            weeks: interval to the follow-up (``check_weeks``).
            scans: ``scan_features`` of (initial, predicted follow-up), when the forecaster uses them.
        """
        weeks = check_weeks(weeks)
        missing = [k for k in ("FVC", "Percent", "Age") if record.get(k) in (None, "")]
        if missing:
            raise RecordError(f"the FVC forecast needs {', '.join(missing)} in the lung-function record")
        values = tabular_features(record, weeks)
        if self.needs_scans:
            if scans is None:
                raise ValueError("this forecaster needs the scan features of the initial and predicted follow-up")
            values.update(scans)
        row = np.array([[values[f] for f in self.features]], dtype=float)
        fvc0 = float(record["FVC"])
        mean, sigma = self.forecaster.predict(row, [fvc0])
        return {"weeks": weeks, "fvc_ml": float(mean[0]), "sd_ml": float(sigma[0]),
                "decline_percent": float(100.0 * (fvc0 - mean[0]) / fvc0),
                "progression_probability": float(progression_probability([fvc0], mean, sigma)[0])}
