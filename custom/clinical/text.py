"""Lung-function tests as text (CIResDiff Sec. 2.3): validation, the one template, the tokenizer.

A record is a mapping with OSIC field names: ``FVC`` (ml), ``Percent`` (FVC % predicted),
``Age`` (years), ``Sex`` (Male/Female), ``SmokingStatus`` (Never smoked / Ex-smoker / Currently
smokes) and optional extras ``DLCO`` (% predicted) and ``PEF`` (peak expiratory flow, l/min).
Missing fields are written as "not measured" (so ``None``, a record-less call from MONAI Label,
says every field is not measured); present fields must be valid, or a ``RecordError`` names the
patient and the field.

The template writes units explicitly and numbers without separators; the project's tokenizer
splits every digit into its own token, so 2450 and 2540 ml differ in tokens the encoder sees,
not in one opaque word.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from monai.data import MetaTensor
from monai.transforms import MapTransform

NUMERIC_FIELDS = {
    # field: (words in the text, unit, decimals, valid range (exclusive low, inclusive high))
    "FVC": ("forced vital capacity", "ml", 0, (0.0, 10000.0)),
    "Percent": ("fvc", "percent predicted", 1, (0.0, 200.0)),
    "Age": ("age", "years", 0, (0.0, 120.0)),
    "DLCO": ("dlco", "percent predicted", 1, (0.0, 200.0)),
    "PEF": ("peak expiratory flow", "litres per minute", 0, (0.0, 1200.0)),
}
SEX = {"male": "male", "m": "male", "female": "female", "f": "female"}
SMOKING = {"never smoked": "never smoked", "ex-smoker": "former smoker", "currently smokes": "current smoker"}
FIELD_ORDER = ("FVC", "Percent", "Age", "Sex", "SmokingStatus", "DLCO", "PEF")
NOT_MEASURED = "not measured"
RECORD_KEYS = ("FVC", "Percent", "Age", "Sex", "SmokingStatus")
"""Lung-function values measured with the initial scan (the model's text input)."""
FOLLOWUP_PREFIX = "Followup"
"""Columns of the follow-up visit (the future): kept for evaluation, never in ``record``."""
OUTCOME_KEYS = ("Progression",)


class RecordError(ValueError):
    """A lung-function record with an invalid field."""


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def validate_record(record: Mapping | None, patient: str = "unknown patient") -> dict[str, object]:
    """Check a lung-function record; returns the normalised fields that are present.

    Args:
        record: OSIC-style fields (strings from a CSV or numbers); ``None`` for no record.
        patient: patient id used in error messages.
    """
    if record is None:
        return {}
    if not isinstance(record, Mapping):
        raise RecordError(
            f"{patient}: the lung-function record must be a mapping of fields, got {type(record).__name__}"
        )
    known = set(FIELD_ORDER)
    unknown = sorted(set(record) - known - {"Patient", "Weeks"})
    if unknown:
        raise RecordError(f"{patient}: unknown lung-function field(s) {unknown}; known fields are {list(FIELD_ORDER)}")
    out: dict[str, object] = {}
    for field, (_, unit, _, (low, high)) in NUMERIC_FIELDS.items():
        value = record.get(field)
        if _missing(value):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RecordError(f"{patient}: field {field} must be a number, got {value!r}") from None
        if math.isnan(number) or math.isinf(number):
            raise RecordError(f"{patient}: field {field} is {value!r}")
        if not low < number <= high:
            raise RecordError(
                f"{patient}: field {field} = {number:g} {unit} is outside the plausible range ({low:g}, {high:g}]"
            )
        out[field] = number
    for field, choices in (("Sex", SEX), ("SmokingStatus", SMOKING)):
        value = record.get(field)
        if _missing(value):
            continue
        key = str(value).strip().lower()
        if key not in choices:
            raise RecordError(f"{patient}: field {field} = {value!r} is not one of {sorted(set(choices))}")
        out[field] = choices[key]
    return out


def record_to_text(record: Mapping | None, patient: str = "unknown patient") -> str:
    """The one template turning a lung-function record into text.

    Args:
        record: OSIC-style fields, or ``None`` when no lung-function test is known.
        patient: patient id used in error messages.
    """
    fields = validate_record(record, patient)
    parts = []
    for field in FIELD_ORDER:
        value = fields.get(field)
        if field in NUMERIC_FIELDS:
            words, unit, decimals, _ = NUMERIC_FIELDS[field]
            parts.append(f"{words} {NOT_MEASURED}" if value is None else f"{words} {value:.{decimals}f} {unit}")
        elif field == "Sex":
            parts.append(f"sex {value or NOT_MEASURED}")
        else:
            parts.append(f"smoking {value or NOT_MEASURED}")
    return " ; ".join(parts) + " ."


def template_vocabulary() -> list[str]:
    """Every word the template can produce, plus digits and punctuation: the tokenizer's closed vocabulary."""
    words: set[str] = set(NOT_MEASURED.split()) | {"sex", "smoking", ";", ".", "-"}
    for phrase, unit, _, _ in NUMERIC_FIELDS.values():
        words |= set(phrase.split()) | set(unit.split())
    for value in list(SEX.values()) + list(SMOKING.values()):
        words |= set(value.split())
    return sorted(words) + [str(d) for d in range(10)]


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(max_length: int = 64):
    """The project's tokenizer: lower-case words of the template, one token per digit, BERT-style specials.

    Built deterministically from the template, so it needs no download and no training corpus.

    Args:
        max_length: length every text is padded or truncated to (the context length L).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + template_vocabulary())}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_length,
    )


class LungFunctionTextd(MapTransform):
    """Write the lung-function record of a case as text (for the CLIP and denoiser text encoders).

    A case without a record (key absent or ``None``) gets the all-"not measured" text. With
    ``image_key`` the text also goes into that image's metadata (under ``text_key``): MONAI Label
    passes the image alone to the inferer (``inferer(image[None], network)``), and
    ``custom.inferer.DiffusionSamplingInferer`` reads the text from there when no context is given,
    so a record sent with the request (``params={"record": {...}}``) reaches the model.

    Args:
        keys: key of the record (usually ``record``).
        text_key: key receiving the text (and its key in the image's metadata).
        id_key: key of the patient id, used in error messages.
        image_key: key of the image (a ``MetaTensor``) whose metadata also gets the text; ``None``: none.
    """

    def __init__(
        self, keys: Sequence[Hashable] | Hashable = "record", text_key: str = "text", id_key: str = "patient",
        image_key: str | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.text_key, self.id_key, self.image_key = text_key, id_key, image_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        key = self.first_key(d)
        record = d.get(key) if key != () else None
        text = record_to_text(record, str(d.get(self.id_key, "unknown patient")))
        d[self.text_key] = text
        image = d.get(self.image_key) if self.image_key is not None else None
        if isinstance(image, MetaTensor):
            # a new MetaTensor on the same voxels: the caller's image and its metadata stay as they were
            d[self.image_key] = MetaTensor(image.as_tensor(), meta={**image.meta, self.text_key: text})
        return d


def default_text() -> str:
    """The text of a case with no lung-function record (every field not measured)."""
    return record_to_text(None)


def _number(value: str) -> int | float | str:
    """A CSV cell as int, float or (stripped) text."""
    text = value.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_lung_function(csv_path: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """Lung-function records per patient from an OSIC-style table.

    ``record`` holds what is measured with the initial scan (``FVC, Percent, Age, Sex,
    SmokingStatus`` and extra columns such as ``DLCO``); ``followup_record`` holds the future
    (``Followup*`` columns and ``Progression``), kept apart so that it never reaches the model's
    input. With several rows per patient (OSIC), the row with the smallest ``Weeks`` is the
    baseline and, without ``Followup*`` columns, the last row gives the follow-up values.

    Args:
        csv_path: ``lung_function.csv``.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lung-function table not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("Patient", *RECORD_KEYS) if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: expected columns Patient, {', '.join(RECORD_KEYS)}; missing {missing or 'all rows'}")
    by_patient: dict[str, list[dict]] = {}
    for row in rows:
        values = {k: _number(v) for k, v in row.items() if v not in ("", None)}
        by_patient.setdefault(row["Patient"].strip(), []).append(values)
    out = {}
    for patient, visits in by_patient.items():
        visits.sort(key=lambda r: r.get("Weeks", 0))
        base = visits[0]
        future = {k: v for k, v in base.items() if k.startswith(FOLLOWUP_PREFIX) or k in OUTCOME_KEYS}
        if not future and len(visits) > 1:
            last = visits[-1]
            future = {"FollowupWeeks": last.get("Weeks", 0) - base.get("Weeks", 0), "FollowupFVC": last["FVC"],
                      "FollowupPercent": last["Percent"]}
        record = {k: v for k, v in base.items() if k not in ("Patient", "Weeks") and k not in future}
        out[patient] = {"record": record, "followup_record": future}
    return out
