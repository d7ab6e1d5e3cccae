"""The model grid: one definition, named by every config, refused when it cannot be a grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from custom.grid import GRIDS, Grid, as_grid

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def test_presets_and_full_form_name_the_same_grids():
    assert as_grid("adult") is GRIDS["adult"]
    assert as_grid({"size": [176, 128, 160], "spacing_mm": 2}) == GRIDS["adult"]
    assert as_grid(GRIDS["paper"]) == Grid((512, 512, 256), 1.0)
    for bad, error in (("huge", ValueError), (48, TypeError), ([96, 96, 96], TypeError),
                       ({"size": [96, 96]}, TypeError)):
        with pytest.raises(error):
            as_grid(bad)
    with pytest.raises(ValueError, match="positive spacing"):
        Grid((8, 8, 8), 0.0)
    with pytest.raises(ValueError, match="three positive sizes"):
        Grid((8, 8), 1.0)


def test_affine_centres_the_box_on_the_point():
    grid = Grid((4, 6, 8), 2.5)
    affine = grid.affine([10.0, -20.0, 30.0])
    first, last = affine @ [0, 0, 0, 1], affine @ [3, 5, 7, 1]
    np.testing.assert_allclose((first[:3] + last[:3]) / 2, [10.0, -20.0, 30.0])
    np.testing.assert_allclose(np.diag(affine)[:3], 2.5)
    np.testing.assert_allclose(grid.extent_mm, [10.0, 15.0, 20.0])
    assert grid.describe() == "4x6x8 at 2.5 mm"


def test_adult_grid_holds_the_largest_adult_lung_region():
    """The shipped grid holds the dilated lungs (10 mm) of the cohort's largest chests with room to spare."""
    from custom.synthetic import ChestPhantom, patient_rng, sample_patient

    largest = np.zeros(3)
    for index in range(300):
        rng = patient_rng(0, index)
        patient = sample_patient("P", rng)
        phantom = ChestPhantom(rng, 1.0, patient.lung_ml)
        # The diaphragm dome cuts each lung at 0.75 of its vertical semi-axis below the centre.
        low = (phantom.lung_centres - phantom.lung_axes * [1.0, 1.0, 0.75]).min(0)
        high = (phantom.lung_centres + phantom.lung_axes).max(0)
        largest = np.maximum(largest, high - low + 20.0)
    assert np.all(largest < GRIDS["adult"].extent_mm), (largest, GRIDS["adult"].extent_mm)


def test_every_config_names_the_grid_of_the_shipped_model():
    """Preparation and inference resample onto one grid; the paper-scale override names its own."""
    configs = {name: json.loads((BUNDLE_ROOT / "configs" / f"{name}.json").read_text(encoding="utf-8"))
               for name in ("prepare", "inference", "paper_scale")}
    assert configs["prepare"]["grid"] == configs["inference"]["grid"] == "adult"
    assert configs["paper_scale"]["grid"] == "paper"


def test_paper_scale_spacing_runs_end_to_end_on_a_crop(raw_case, tmp_path):
    """The paper's 1 mm voxels (a 64^3 crop of its 512 x 512 x 256 grid) through inference, as a declared crop."""
    import nibabel as nib

    from cirresdiff_bundle import predict_followup

    crop = {"size": [64, 64, 64], "spacing_mm": GRIDS["paper"].spacing_mm}
    result = predict_followup(raw_case, {"FVC": 2400, "Percent": 65, "Age": 70, "Sex": "Male"}, output_dir=tmp_path,
                              grid=crop, allow_cropped=True)[0]
    assert result["summary"]["coverage"]["cropped"] == (result["summary"]["coverage"]["lungs_inside_grid"] < 0.98)
    written = nib.load(tmp_path / "SYN0000" / "followup.nii.gz")
    assert written.shape == nib.load(raw_case).shape  # mapped back onto the initial scan
    assert np.isfinite(np.asarray(written.dataobj)).all()
