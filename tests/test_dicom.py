"""DICOM series reading, checks and round trips on real files from pydicom's test data."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from scripts.dicom import LPS_TO_RAS, list_series, read_series, series_template, write_series
from scripts.volumes import VolumeError, load_volume
from tests.conftest import ROOT, assert_user_error


def make_series(folder, n=5, gap=2.5, source="CT_small.dcm", order=None, tilt_mm=0.0, positions=None):
    """Copies of a real slice at known positions along the slice normal, with a known offset per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file(source))
    uid = generate_uid()
    base = np.array([float(v) for v in template.ImagePositionPatient])
    order = order or list(range(n))
    written = []
    for file_idx, k in enumerate(order):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n - k  # deliberately opposite to the spatial order
        z = positions[k] if positions is not None else k * gap
        ds.ImagePositionPatient = [float(base[0] + k * tilt_mm), float(base[1]), float(base[2] + z)]
        ds.SliceThickness = 99.0  # wrong on purpose: spacing must come from positions
        arr = ds.pixel_array.astype(np.int32) + 10 * k
        ds.PixelData = arr.astype(ds.pixel_array.dtype).tobytes()
        path = folder / f"img{file_idx:03d}.dcm"
        ds.save_as(path)
        written.append(path)
    return template, uid, base


def test_series_is_ordered_by_position_in_hu_with_spacing_from_positions(tmp_path):
    template, uid, base = make_series(tmp_path / "s", n=5, gap=2.5, order=[3, 0, 4, 1, 2])
    img = read_series(tmp_path / "s")
    assert img.shape == (1, 128, 128, 5)
    raw = template.pixel_array.astype(np.float32)
    slope, intercept = float(template.RescaleSlope), float(template.RescaleIntercept)
    for k in range(5):
        np.testing.assert_allclose(img[0, :, :, k].numpy(), (raw + 10 * k).T * slope + intercept)
    ps = [float(v) for v in template.PixelSpacing]
    lps = np.eye(4)
    lps[:3, :3] = np.diag([ps[1], ps[0], 2.5])
    lps[:3, 3] = base
    np.testing.assert_allclose(np.asarray(img.affine), LPS_TO_RAS @ lps, atol=1e-5)
    assert img.meta["modality"] == "CT" and img.meta["series_uid"] == uid


def test_several_series_need_a_choice(tmp_path):
    _, uid_ct, _ = make_series(tmp_path / "mixed", n=3)
    _, uid_mr, _ = make_series(tmp_path / "mixed" / "mr", n=4, source="MR_small.dcm")
    with pytest.raises(VolumeError) as err:
        read_series(tmp_path / "mixed")
    assert uid_ct in str(err.value) and uid_mr in str(err.value) and "2 series" in str(err.value)
    assert read_series(tmp_path / "mixed", series_uid=uid_mr).shape == (1, 64, 64, 4)
    assert set(list_series(tmp_path / "mixed")) == {uid_ct, uid_mr}


def test_empty_folder_and_non_dicom_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="empty: no DICOM image files"):
        load_volume(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    with pytest.raises(VolumeError, match="no DICOM image files"):
        load_volume(tmp_path / "junk")


def test_non_uniform_spacing_is_refused_and_gantry_tilt_is_measured(tmp_path, caplog):
    make_series(tmp_path / "gap", n=5, positions=[0, 2.5, 5.0, 10.0, 12.5])
    with pytest.raises(VolumeError, match="non-uniform slice spacing.*5.000 mm"):
        read_series(tmp_path / "gap")
    make_series(tmp_path / "tilt", n=5, tilt_mm=0.5)
    with caplog.at_level("INFO", logger="scripts.dicom"):
        assert read_series(tmp_path / "tilt").meta["gantry_tilt_deg"] == pytest.approx(11.31, abs=0.01)
    assert "gantry tilt of 11.31 degrees" in caplog.text and "orthogonal grid" in caplog.text


SPHERE_LPS, SPHERE_MM, SPHERE_HU = np.array([3.0, -2.0, 34.0]), 8.0, 300.0


def make_tilted_series(folder, tilt_deg=20.0, n=24, dz=2.0, size=64):
    """Axial slices of a water phantom holding a +300 HU sphere at ``SPHERE_LPS``, acquired with a gantry tilt:
    slice k sits ``k * dz`` along the normal and ``k * dz * tan(tilt)`` along the column direction (sheared
    ImagePositionPatient sequence); every pixel samples the sphere at its own patient position."""
    folder.mkdir(parents=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid, origin = generate_uid(), np.array([-30.0, -36.0, 10.0])
    step = np.array([0.0, dz * np.tan(np.radians(tilt_deg)), dz])
    j, i = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")  # (row, column)
    for k in range(n):
        pos = origin + k * step
        xyz = np.stack([pos[0] + i, pos[1] + j, np.full(i.shape, pos[2])], axis=-1)  # 1 mm pixels
        hu = np.where(np.linalg.norm(xyz - SPHERE_LPS, axis=-1) < SPHERE_MM, SPHERE_HU, 0.0)
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, generate_uid(), k + 1
        ds.Rows = ds.Columns = size
        ds.PixelSpacing, ds.ImageOrientationPatient = [1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.GantryDetectorTilt = tilt_deg
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"s{k:03d}.dcm")
    return origin, step


def test_gantry_tilted_series_is_read_on_an_orthogonal_grid_where_the_anatomy_is(tmp_path):
    """A 20 degree tilt: the sphere's centre in the read volume (voxel -> affine -> LPS) is within one voxel of its
    true patient position, its HU are kept; a series written from it is orthogonal, new, without the tilt tag.
    Read with the normal-only affine (ignoring the shear), the centre would be 8.7 mm off."""
    make_tilted_series(tmp_path / "tilted")
    img = read_series(tmp_path / "tilted")
    assert img.meta["gantry_tilt_deg"] == pytest.approx(20.0, abs=0.01)
    affine, vol = np.asarray(img.affine), img[0].numpy()
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [1.0, 1.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(affine[:3, :3] / spacing, np.diag([-1.0, -1.0, 1.0]), atol=1e-9)  # orthogonal
    idx = np.argwhere(vol > SPHERE_HU / 2).mean(axis=0)
    centre = (np.linalg.inv(LPS_TO_RAS) @ affine @ [*idx, 1.0])[:3]
    assert np.all(np.abs(centre - SPHERE_LPS) <= spacing), (centre, SPHERE_LPS)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1) @ affine[:3, :3].T
    lps = (grid + affine[:3, 3]) * [-1.0, -1.0, 1.0]
    inside = np.linalg.norm(lps - SPHERE_LPS, axis=-1) < SPHERE_MM - 2.0
    assert inside.sum() > 100 and np.abs(vol[inside] - SPHERE_HU).max() < 1.0
    assert np.abs(vol[np.linalg.norm(lps - SPHERE_LPS, axis=-1) > SPHERE_MM + 2.0]).max() < 1.0  # water or fill
    write_series(vol, affine, series_template(tmp_path / "tilted"), tmp_path / "out")
    back = read_series(tmp_path / "out")
    assert back.meta["gantry_tilt_deg"] == 0.0 and back.meta["series_uid"] != img.meta["series_uid"]
    np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-4)
    assert all("GantryDetectorTilt" not in pydicom.dcmread(f) for f in (tmp_path / "out").iterdir())


def test_mixed_slice_sizes_are_refused(tmp_path):
    make_series(tmp_path / "m", n=3)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ref = pydicom.dcmread(next((tmp_path / "m").iterdir()))
    ds.SeriesInstanceUID = ref.SeriesInstanceUID
    ds.ImageOrientationPatient = ref.ImageOrientationPatient
    ds.save_as(tmp_path / "m" / "odd.dcm")
    with pytest.raises(VolumeError, match="odd.dcm"):
        read_series(tmp_path / "m")


def test_convert_command_keeps_the_affine(tmp_path):
    make_series(tmp_path / "s", n=4, gap=3.0)
    out = tmp_path / "ct.nii.gz"
    res = subprocess.run(
        [sys.executable, "-m", "scripts.dicom", "convert", str(tmp_path / "s"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    direct = read_series(tmp_path / "s")
    nii = nib.load(out)
    np.testing.assert_allclose(nii.affine, np.asarray(direct.affine), atol=1e-5)
    np.testing.assert_allclose(np.asarray(nii.dataobj), direct[0].numpy())
    bad = subprocess.run(
        [sys.executable, "-m", "scripts.dicom", "convert", str(tmp_path / "nope"), str(out) + "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert_user_error(bad, "nope: no such file")
    assert not (tmp_path / "ct.nii.gzx").exists()


def test_write_and_read_back_an_oblique_series(tmp_path):
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.RandomState(0)
    vol = np.rint(rng.uniform(-1000, 1500, size=(20, 16, 6)))
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[0.7 * c, -0.8 * s, 0, 12.0], [0.7 * s, 0.8 * c, 0, -30.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])
    write_series(vol, affine, template, tmp_path / "out")
    back = read_series(tmp_path / "out")
    np.testing.assert_allclose(back[0].numpy(), vol, atol=1e-4)
    np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-5)
    ds = pydicom.dcmread(next((tmp_path / "out").iterdir()))
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.SeriesInstanceUID != template.SeriesInstanceUID
    assert ds.PatientName == template.PatientName


def test_reading_never_modifies_the_files(tmp_path):
    make_series(tmp_path / "s", n=3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    read_series(tmp_path / "s")
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    shutil.rmtree(tmp_path / "s")
