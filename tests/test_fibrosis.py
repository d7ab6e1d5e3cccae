"""The high-attenuation area and the fibrosis label map on constructed scans with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from custom.fibrosis import FIBROSIS_LABELS, fibrosis_map, haa_summary, high_attenuation_area

SPACING = (1.0, 1.0, 1.0)


def _lung_block() -> tuple[np.ndarray, np.ndarray]:
    """A 40^3 mm lung of -850 HU inside soft tissue, on a 1 mm grid."""
    hu = np.full((48, 48, 48), 40.0, dtype=np.float32)
    lungs = np.zeros(hu.shape, dtype=np.uint8)
    lungs[4:44, 4:44, 4:44] = 1
    hu[lungs > 0] = -850.0
    return hu, lungs


def test_ground_glass_is_haa_and_normal_lung_is_not():
    hu, lungs = _lung_block()
    hu[10:20, 10:20, 10:20] = -450.0  # a 1 ml ground-glass cube
    haa = high_attenuation_area(hu, lungs, SPACING)
    # the cube's core is found, up to its smoothed 1-voxel edge; nothing far from it is
    assert haa[11:19, 11:19, 11:19].all()
    assert not haa[25:40, 25:40, 25:40].any()
    assert 8**3 <= haa.sum() <= 12**3


def test_vessels_and_their_partial_volume_edge_are_excluded_but_thin_reticulation_is_kept():
    hu, lungs = _lung_block()
    x, y = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    vessel = (x - 30) ** 2 + (y - 30) ** 2 <= 9  # a 6 mm vessel along z
    hu[vessel[:, :, None] & (lungs > 0)] = 40.0
    hu[8:20, 8:20, 8:20] = -500.0  # reticulation: a background in the HAA range ...
    hu[8:20, 14, 8:20] = -150.0  # ... crossed by a one-voxel dense line
    haa = high_attenuation_area(hu, lungs, SPACING)
    near_vessel = (x - 30) ** 2 + (y - 30) ** 2 <= 25
    assert not haa[near_vessel[:, :, None] & (lungs > 0)].any()
    assert haa[10:18, 10:18, 10:18].mean() > 0.9  # the thin line is not mistaken for a vessel


def test_empty_lungs_give_no_haa():
    hu, lungs = _lung_block()
    assert not high_attenuation_area(hu, np.zeros_like(lungs), SPACING).any()


def test_label_map_and_summary_separate_known_from_new_fibrosis():
    hu, lungs = _lung_block()
    before = hu.copy()
    before[10:20, 10:20, 10:20] = -450.0
    after = before.copy()
    after[26:36, 26:36, 26:36] = -450.0  # a new lesion at follow-up
    initial_haa = high_attenuation_area(before, lungs, SPACING)
    followup_haa = high_attenuation_area(after, lungs, SPACING)
    labels = fibrosis_map(initial_haa, followup_haa)
    assert (labels[12:18, 12:18, 12:18] == FIBROSIS_LABELS["fibrosis"]).all()
    assert (labels[28:34, 28:34, 28:34] == FIBROSIS_LABELS["new fibrosis"]).all()
    assert set(np.unique(labels)) == {0, 1, 2}
    summary = haa_summary(initial_haa, followup_haa, lungs, SPACING)
    assert summary["lung_volume_ml"] == pytest.approx(64.0)
    assert summary["haa_percent_followup"] == pytest.approx(2 * summary["haa_percent_initial"], rel=0.01)
    assert summary["new_fibrosis_ml"] == pytest.approx(initial_haa.sum() / 1000.0, rel=0.01)
