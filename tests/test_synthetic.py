"""The synthetic IPF cohort has the properties the method relies on, not just the files."""

from __future__ import annotations

import csv
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from custom.constants import LEFT_LUNG, LESION_LABELS, RIGHT_LUNG
from custom.synthetic import (
    SMALL_BODY_SCALE,
    STABLE_FACTOR,
    STABLE_FRACTION,
    ChestPhantom,
    DetailGrid,
    baseline_rate,
    decline_law,
    generate_cohort,
    lung_volume_ml,
    patient_grid,
    patient_rng,
    sample_patient,
    summarize_cohort,
    voxel_grid,
)

N = 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, n_patients=N, seed=3, body_scale=SMALL_BODY_SCALE)
    return out


def _load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _rows(cohort):
    with open(cohort / "lung_function.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_hounsfield_ranges_per_tissue(cohort):
    hu, _ = _load(cohort / "SYN0000" / "initial.nii.gz")
    lungs, _ = _load(cohort / "SYN0000" / "initial_lungs.nii.gz")
    lesions, _ = _load(cohort / "SYN0000" / "initial_lesions.nii.gz")
    parenchyma = hu[(lungs > 0) & (lesions == 0)]
    assert -900 < np.median(parenchyma) < -780
    corner = hu[:5, :5, :]
    assert abs(corner.mean() + 1000) < 30  # air outside the body
    assert hu.max() > 400  # bone
    fat = ((hu > -150) & (hu < -50)).mean()
    soft = ((hu > 0) & (hu < 80)).mean()
    assert fat > 0.01 and soft > 0.05
    reticulation = hu[lesions == LESION_LABELS["reticulation"]]
    ground_glass = hu[lesions == LESION_LABELS["ground_glass"]]
    assert np.median(ground_glass) > np.median(parenchyma) + 200
    assert reticulation.max() > -250
    honey = hu[lesions == LESION_LABELS["honeycombing"]]
    if honey.size:
        assert (honey < -850).mean() > 0.2 and (honey > -200).mean() > 0.2  # cysts with walls


def test_lesions_grow_in_progressors_not_in_stable_patients(cohort):
    growth = {}
    for row in _rows(cohort):
        before, _ = _load(cohort / row["Patient"] / "initial_lesions.nii.gz")
        after, aff = _load(cohort / row["Patient"] / "followup_lesions.nii.gz")
        voxel_ml = abs(np.linalg.det(aff[:3, :3])) / 1000
        growth[row["Patient"]] = ((after > 0).sum() - (before > 0).sum()) * voxel_ml, int(row["Progression"])
    prog = [g for g, p in growth.values() if p]
    stable = [g for g, p in growth.values() if not p]
    assert prog and stable
    assert min(prog) > 0
    assert np.mean(prog) > 2 * max(np.mean(stable), 0.1)


def test_fvc_decline_agrees_with_the_label(cohort):
    for row in _rows(cohort):
        decline = (float(row["FVC"]) - float(row["FollowupFVC"])) / float(row["FVC"])
        assert int(row["Progression"]) == int(decline >= 0.10 - 1e-3), row


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_saved_transforms_map_followup_lungs_onto_initial_lungs(cohort):
    for pid in ("SYN0000", "SYN0001", "SYN0002"):
        initial, affine = _load(cohort / pid / "initial_lungs.nii.gz")
        followup, _ = _load(cohort / pid / "followup_lungs.nii.gz")
        transforms = json.loads((cohort / pid / "transforms.json").read_text(encoding="utf-8"))
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in initial.shape], indexing="ij"), -1).reshape(-1, 3)
        world = idx @ affine[:3, :3].T + affine[:3, 3]
        for name, label in (("left_lung", LEFT_LUNG), ("right_lung", RIGHT_LUNG)):
            t = np.asarray(transforms[name])
            moved = world @ t[:3, :3].T + t[:3, 3]
            vox = (moved - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
            moving = (followup == label).astype(np.float32)
            warped = ndimage.map_coordinates(moving, vox.T, order=1).reshape(initial.shape)
            dice = _dice(warped > 0.5, initial == label)
            assert dice > 0.95, (pid, name, dice)
        # Without the transforms the lungs do not line up as well: registration is needed.
        assert _dice(followup > 0, initial > 0) < 0.95


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    generate_cohort(tmp_path / "a", n_patients=2, seed=7, body_scale=SMALL_BODY_SCALE)
    generate_cohort(tmp_path / "b", n_patients=2, seed=7, body_scale=SMALL_BODY_SCALE, workers=2)
    generate_cohort(tmp_path / "c", n_patients=2, seed=8, body_scale=SMALL_BODY_SCALE)
    a, b, c = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert a == b and len(a) >= 15, "the same seed gives the same bytes, in one process or two"
    assert a["SYN0000/initial.nii.gz"] != c["SYN0000/initial.nii.gz"]


def test_split_is_disjoint_and_folds_cover_training(cohort):
    datalist = json.loads((cohort / "datalist.json").read_text(encoding="utf-8"))
    train = {e["patient"] for e in datalist["training"]}
    test = {e["patient"] for e in datalist["testing"]}
    assert not train & test and len(train | test) == N and test
    assert {e["fold"] for e in datalist["training"]} <= set(range(5))
    for entry in datalist["training"] + datalist["testing"]:
        assert (cohort / entry["initial"]).is_file() and (cohort / entry["followup_lungs"]).is_file()


def test_progression_depends_on_baseline_values():
    patients = [sample_patient(f"P{i}", patient_rng(11, i)) for i in range(600)]
    percent = np.array([p.percent for p in patients])
    decline = np.array([p.decline for p in patients])
    assert np.corrcoef(percent, decline)[0, 1] < -0.2
    smokers = decline[[p.smoking == "Currently smokes" for p in patients]]
    never = decline[[p.smoking == "Never smoked" for p in patients]]
    assert smokers.mean() > never.mean() + 0.02
    rate = np.mean([p.progression for p in patients])
    assert 0.25 < rate < 0.6
    assert all(p.followup_burden >= p.burden for p in patients)


def test_decline_law_is_what_sample_patient_draws():
    """The law given the baseline predicts the drawn cohort: its mean progression probability is the observed
    rate, and its mixture has the near-stable share at the slowed rate."""
    patients = [sample_patient(f"P{i}", patient_rng(12, i)) for i in range(3000)]
    predicted = [np.mean(decline_law(p.percent, p.smoking, p.weeks, quantiles=400) >= 0.10 - 1e-9) for p in patients]
    observed = np.mean([p.progression for p in patients])
    assert abs(np.mean(predicted) - observed) < 0.03
    declines = np.array([p.decline for p in patients])
    law_means = [decline_law(p.percent, p.smoking, p.weeks, quantiles=400).mean() for p in patients]
    assert abs(np.mean(law_means) - declines.mean()) < 0.005
    law = decline_law(70.0, "Ex-smoker", 52.0)
    base = baseline_rate(70.0, "Ex-smoker")
    slow = np.abs(law - STABLE_FACTOR * base) < np.abs(law - base)
    assert abs(slow.mean() - STABLE_FRACTION) < 0.01
    unclipped = law > -0.03
    assert np.allclose(decline_law(70.0, "Ex-smoker", 26.0)[unclipped], law[unclipped] / 2.0)


def test_dicom_series_matches_the_nifti(tmp_path):
    import SimpleITK as sitk

    generate_cohort(tmp_path, n_patients=1, seed=5, write_dicom=True, body_scale=SMALL_BODY_SCALE)
    folder = tmp_path / "SYN0000" / "initial_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    from_dicom = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (x, y, z)
    hu, affine = _load(tmp_path / "SYN0000" / "initial.nii.gz")
    # DICOM is LPS: x and y axes are flipped relative to RAS, origin likewise.
    assert np.array_equal(from_dicom, hu)
    assert np.allclose(image.GetSpacing(), np.linalg.norm(affine[:3, :3], axis=0), atol=1e-3)
    origin_ras = np.array(image.GetOrigin()) * [-1, -1, 1]
    assert np.allclose(origin_ras, affine[:3, 3], atol=1e-3)


def test_lung_volume_follows_fvc(cohort):
    """Lung volume on CT tracks FVC (as in ILD): the rendered lungs have the volume the FVC asks for."""
    stats = json.loads((cohort / "image_stats.json").read_text(encoding="utf-8"))
    fvc = np.array([float(r["FVC"]) for r in _rows(cohort)])
    rendered = np.array([stats[r["Patient"]]["lung_ml"] for r in _rows(cohort)]) / SMALL_BODY_SCALE**3
    wanted = np.array([sample_patient(r["Patient"], patient_rng(3, i)).lung_ml for i, r in enumerate(_rows(cohort))])
    np.testing.assert_allclose(rendered, wanted, rtol=0.12)
    assert np.corrcoef(fvc, rendered)[0, 1] > 0.8
    assert summarize_cohort(cohort)["lung_ml_FVC_correlation"] == pytest.approx(np.corrcoef(fvc, rendered)[0, 1])
    np.testing.assert_allclose(wanted, [lung_volume_ml(v) for v in fvc], rtol=0.25)


def test_adult_scans_have_real_ct_geometry():
    """body_scale 1: a 512 x 512 matrix of 0.6-0.9 mm pixels, 1-2.5 mm slices, both lungs inside the scan."""
    for index in range(4):
        rng = patient_rng(0, index)
        patient = sample_patient("P", rng)
        phantom = ChestPhantom(rng, 1.0, patient.lung_ml)
        shape, affine = patient_grid(phantom, rng)
        spacing = np.diag(affine)[:3]
        assert shape[:2] == (512, 512) and 0.6 <= spacing[0] <= 0.9 and 1.0 <= spacing[2] <= 2.5
        top = phantom.lung_centres[:, 2] + phantom.lung_axes[:, 2]
        bottom = phantom.lung_centres[:, 2] - 0.75 * phantom.lung_axes[:, 2]
        assert affine[2, 3] < bottom.min() and affine[2, 3] + (shape[2] - 1) * spacing[2] > top.max()


def test_detail_grid_resamples_linearly_and_labels_by_nearest_voxel():
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = [-10.0, -5.0, 3.0]
    detail = DetailGrid((40, 20, 6), affine, 1.5)
    assert np.allclose(np.diag(detail.affine)[:3], [1.5, 1.5, 2.0])
    x, y, z = np.moveaxis(voxel_grid(detail.shape, detail.affine), -1, 0)
    ramp = detail.to_scan((2.0 * x - y + 0.5 * z).astype(np.float32), linear=True)
    sx, sy, sz = np.moveaxis(voxel_grid((40, 20, 6), affine), -1, 0)
    np.testing.assert_allclose(ramp, 2.0 * sx - sy + 0.5 * sz, atol=1e-4)  # linear interpolation is exact on a ramp
    labels = detail.to_scan((x > 0).astype(np.uint8), linear=False)
    assert set(np.unique(labels)) == {0, 1} and np.all(labels[sx < -1.0] == 0) and np.all(labels[sx > 1.0] == 1)


def test_interrupted_generation_resumes_with_the_same_files(tmp_path):
    generate_cohort(tmp_path / "a", n_patients=2, seed=7, body_scale=SMALL_BODY_SCALE)
    before = _hashes(tmp_path / "a")
    (tmp_path / "a" / "SYN0001" / "transforms.json").unlink()  # SYN0001 interrupted before its last file
    stamp = (tmp_path / "a" / "SYN0000" / "initial.nii.gz").stat().st_mtime_ns
    generate_cohort(tmp_path / "a", n_patients=2, seed=7, body_scale=SMALL_BODY_SCALE)
    assert _hashes(tmp_path / "a") == before
    assert (tmp_path / "a" / "SYN0000" / "initial.nii.gz").stat().st_mtime_ns == stamp, "a complete patient is kept"
