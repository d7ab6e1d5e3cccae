"""Which cases a workflow sees: the prepared datalist split into training, validation and test.

The prepared datalist (written by pre-registration, see docs/architecture.md) has a fixed
``testing`` section and ``training`` entries carrying a cross-validation ``fold``. Training
uses every fold but ``val_fold``; validation uses ``val_fold``; evaluation uses ``testing``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

from monai.data import MetaTensor
from monai.transforms import MapTransform

from custom.progression import check_weeks

logger = logging.getLogger(__name__)

PATH_KEYS = ("image", "target", "mask", "lungs", "oracle", "new_lesions")


def read_datalist(datalist: str | os.PathLike) -> dict[str, list[dict]]:
    """Read a prepared datalist and make its image paths absolute.

    Args:
        datalist: path of ``datalist.json``; relative image paths are relative to its folder.
    """
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    for section in ("training", "testing"):
        if not isinstance(content.get(section), list):
            raise ValueError(f"datalist {path} has no '{section}' list")
    for entries in content.values():
        if not isinstance(entries, list):
            continue
        for entry in entries:
            for key in PATH_KEYS:
                if key in entry and not os.path.isabs(entry[key]):
                    entry[key] = str((path.parent / entry[key]).resolve())
    return content


def check_no_leakage(cases: list[dict], test_cases: list[dict], what: str) -> None:
    """Raise if a test patient is among ``cases`` (learning from the test set would invalidate it).

    Args:
        cases: the cases a training step will learn from.
        test_cases: the held-out test cases.
        what: name of the training step, for the message.
    """
    leaked = sorted({c["patient"] for c in cases} & {c["patient"] for c in test_cases})
    if leaked:
        raise ValueError(f"{what} would use test patients {leaked}: the test split must stay unseen.")


def check_files_exist(cases: list[dict], datalist: str | os.PathLike) -> None:
    """Raise one clear error listing every image file the datalist names but the disk lacks.

    Args:
        cases: datalist entries with absolute paths.
        datalist: the datalist's path, for the message.
    """
    missing = [c[k] for c in cases for k in PATH_KEYS if k in c and not os.path.isfile(c[k])]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"datalist {datalist} names files that do not exist: {shown}")


class DatasetSplit:
    """The training, validation and test cases of a prepared dataset.

    Args:
        datalist: path of the prepared ``datalist.json``.
        val_fold: cross-validation fold held out for validation (0-4); ``None`` trains on all folds.
        cohort_dir: where to generate the synthetic cohort if the datalist does not exist yet.
        num_patients: size of the synthetic cohort generated on first use.
        grid: the model grid (``custom.grid`` preset or its full form) used when preparing the synthetic cohort on
            first use.
    """

    def __init__(
        self,
        datalist: str | os.PathLike,
        val_fold: int | None = 0,
        cohort_dir: str | os.PathLike | None = None,
        num_patients: int = 24,
        grid: str | Mapping = "adult",
    ) -> None:
        self.datalist = Path(datalist)
        self.val_fold = val_fold
        self.cohort_dir = Path(cohort_dir) if cohort_dir is not None else None
        self.num_patients = num_patients
        self.grid = grid

    def ensure(self) -> Path:
        """Generate and prepare the synthetic cohort when no datalist exists (first use)."""
        if self.datalist.is_file():
            return self.datalist
        if self.cohort_dir is None:
            raise FileNotFoundError(f"datalist not found: {self.datalist}")
        from custom.preregistration import prepare_config
        from custom.synthetic import generate_cohort

        cohort_datalist = self.cohort_dir / "datalist.json"
        if not cohort_datalist.is_file():
            logger.info(f"no dataset at {self.datalist}: generating the synthetic cohort in {self.cohort_dir}")
            generate_cohort(self.cohort_dir, n_patients=self.num_patients)
        prepare_config(cohort_dir=str(self.cohort_dir), prepared_dir=str(self.datalist.parent),
                       grid=self.grid).get_parsed_content("prepare")
        return self.datalist

    def _content(self) -> dict[str, list[dict]]:
        content = read_datalist(self.datalist)
        check_no_leakage(content["training"], content["testing"], "training")
        return content

    def training(self) -> list[dict]:
        """Training cases: every fold except the validation fold."""
        content = self._content()
        cases = [c for c in content["training"] if self.val_fold is None or c.get("fold") != self.val_fold]
        check_files_exist(cases, self.datalist)
        return cases

    def validation(self, num_cases: int | None = None) -> list[dict]:
        """Validation cases: the validation fold, at most ``num_cases`` of them.

        Args:
            num_cases: cap on the number of cases (whole-volume sampling is slow); ``None`` for all.
        """
        content = self._content()
        cases = [c for c in content["training"] if self.val_fold is not None and c.get("fold") == self.val_fold]
        cases = cases[:num_cases] if num_cases is not None else cases
        check_files_exist(cases, self.datalist)
        return cases

    def testing(self) -> list[dict]:
        """The held-out test cases."""
        cases = self._content()["testing"]
        check_files_exist(cases, self.datalist)
        return cases


class RegionAsLungsd(MapTransform):
    """Let the dilated region stand in for the lung labels of a case that has none.

    Cases prepared before the lung labels were written, and datalists from elsewhere (MONAI Label's
    train task), carry only the region. Their loss weight and lung scores then count the whole
    region, as before this bundle scored the lungs apart; a warning says so once.

    Args:
        keys: key of the lung labels.
        region_key: key of the dilated lung region.
    """

    warned = False

    def __init__(self, keys: Hashable = "lungs", region_key: str = "mask") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.region_key = region_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.keys:
            if key not in d:
                if not RegionAsLungsd.warned:
                    logger.warning(f"a case has no '{key}': its region '{self.region_key}' stands in for the lungs")
                    RegionAsLungsd.warned = True
                d[key] = d[self.region_key]
        return d


class FollowupIntervald(MapTransform):
    """The interval from the initial scan to the follow-up, in weeks, as the model's ``weeks`` input.

    Training and evaluation read each case's ``FollowupWeeks`` (its follow-up record in the
    datalist); inference gives the interval asked for. With ``image_key`` it also goes into that
    image's metadata, where the inferer finds it when MONAI Label calls ``inferer(image[None], network)``.

    Args:
        weeks: the interval asked for (inference, 1 to 260 weeks); ``None`` reads ``FollowupWeeks``
            from ``record_key`` (an error names the patient when it is missing or invalid).
        record_key: key of the case's follow-up record.
        weeks_key: key receiving the interval (a float).
        id_key: key of the patient id, used in error messages.
        image_key: key of the image (a ``MetaTensor``) whose metadata also gets it; ``None``: none.
    """

    def __init__(self, weeks: float | None = None, record_key: str = "followup_record", weeks_key: str = "weeks",
                 id_key: str = "patient", image_key: str | None = None) -> None:
        super().__init__(record_key, allow_missing_keys=True)
        self.weeks = None if weeks is None else check_weeks(weeks)
        self.record_key, self.weeks_key, self.id_key, self.image_key = record_key, weeks_key, id_key, image_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        weeks = self.weeks
        if weeks is None:
            record = d.get(self.record_key) or {}
            patient = d.get(self.id_key, "unknown patient")
            if record.get("FollowupWeeks") is None:
                raise ValueError(
                    f"{patient}: no FollowupWeeks in '{self.record_key}': every training and evaluation case needs "
                    "the interval between its scans (weeks), an input of the model"
                )
            try:
                weeks = check_weeks(record["FollowupWeeks"])
            except ValueError as error:
                raise ValueError(f"{patient}: FollowupWeeks: {error}") from None
        d[self.weeks_key] = weeks
        image = d.get(self.image_key) if self.image_key is not None else None
        if isinstance(image, MetaTensor):
            # a new MetaTensor on the same voxels: the caller's image and its metadata stay as they were
            d[self.image_key] = MetaTensor(image.as_tensor(), meta={**image.meta, self.weeks_key: weeks})
        return d
