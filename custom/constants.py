"""Conventions shared by every stage of the pipeline; each value is defined here only."""

from __future__ import annotations

LEFT_LUNG = 1
"""Label of the left lung in lung label maps."""
RIGHT_LUNG = 2
"""Label of the right lung in lung label maps."""
LUNG_LABELS = {"left": LEFT_LUNG, "right": RIGHT_LUNG}

LESION_LABELS = {"reticulation": 1, "honeycombing": 2, "ground_glass": 3}
"""Labels of the synthetic cohort's lesion masks."""

HU_WINDOW = (-1000.0, 200.0)
"""Fixed Hounsfield window mapped linearly to [0, 1] (values outside are clipped)."""

AIR_HU = -1000.0
"""Value used to pad CT volumes outside the field of view after resampling."""

REGION_MARGIN_MM = 10.0
"""Dilation of the lungs into the region the model predicts (CIResDiff Sec. 2.1: the lungs plus a
margin for the pleura and motion); preparation and inference read it from here."""

DEFAULT_WEEKS = 52.0
"""Interval from the initial scan to the follow-up, in weeks, when none is asked for (a year: the
OSIC follow-up); the denoiser's interval embedding is centred on it."""
