"""scripts/run_ablations.py's Table 1: rows, fold statistics and the paired difference to DM-R-CIP."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest


@pytest.fixture(scope="module")
def ablations(bundle_root):
    spec = importlib.util.spec_from_file_location("run_ablations", bundle_root / "scripts" / "run_ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(model: float, identity: float = 20.0, smoothed: float = 21.0) -> dict:
    def cells(value: float) -> dict:
        return {metric: {"mean": value} for metric in ("psnr_lungs", "ssim_lungs", "psnr_change", "ssim_change")}

    return {"model": cells(model), "identity": cells(identity), "smoothed": cells(smoothed), "cases": 5}


def test_table_has_the_reference_rows_fold_statistics_and_paired_differences(ablations):
    results = {"DM": [_summary(18.0), _summary(19.0), _summary(17.0)],
               "DM-R-CIP": [_summary(22.0), _summary(22.5), _summary(23.0)]}
    rows = ablations.rows(results, {"DM": 2, "DM-R-CIP": 0})
    assert list(rows) == ["identity (follow-up := initial)", "smoothed initial scan",
                          "DM (2 of 3 folds did not beat identity)", "DM-R-CIP"]
    text = ablations.table(rows)
    assert "| DM-R-CIP | 22.500 ± 0.500 |" in text and "| identity (follow-up := initial) | 20.000 ± 0.000 |" in text
    # DM - DM-R-CIP per fold: -4, -3.5, -6; mean -4.5, t interval over 3 folds
    diff = np.array([-4.0, -3.5, -6.0])
    half = 4.302653 * diff.std(ddof=1) / np.sqrt(3)
    assert f"| DM (2 of 3 folds did not beat identity) | {-4.5:+.3f} [{-4.5 - half:+.3f}, {-4.5 + half:+.3f}] |" in text
    assert "| identity (follow-up := initial) | -2.500 [" in text
    assert text.count("| DM-R-CIP |") == 1  # the reference has no row against itself
