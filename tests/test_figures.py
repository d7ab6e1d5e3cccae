"""The comparison figure is a real PNG showing the slice of largest change."""

from __future__ import annotations

import numpy as np
from PIL import Image

from custom.figures import _lesion_centre, save_comparison_figure


def test_figure_goes_through_the_largest_change_and_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    initial = rng.random((40, 40, 32), dtype=np.float32) * 0.2
    generated = initial.copy()
    generated[28:34, 8:14, 20:26] += 0.5
    centre = _lesion_centre(initial, generated, None)
    assert all(abs(a - b) <= 2 for a, b in zip(centre, (31, 11, 23))), centre
    path = save_comparison_figure(tmp_path / "case.png", initial, generated, generated, uncertainty=generated * 0)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 2 * im.height
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.png"]
