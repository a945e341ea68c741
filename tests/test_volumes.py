"""Volume I/O: geometry from headers, bad input errors, atomic writes."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from scripts.volumes import VolumeError, load_volume, save_volume, spacing_of


def test_nifti_round_trip_keeps_affine_and_values(tmp_path, phantom_file):
    img = load_volume(phantom_file)
    assert img.shape == (1, 48, 48, 12)
    np.testing.assert_allclose(np.asarray(img.affine), nib.load(phantom_file).affine, atol=1e-6)
    out = save_volume(img, img.affine, tmp_path / "out.nii.gz", dtype="int16")
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, nib.load(phantom_file).affine, atol=1e-6)
    assert back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(nib.load(phantom_file).dataobj))
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)


def test_nrrd_in_lps_comes_out_in_ras(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.5, 0.6, 2.0]),
        "space origin": np.array([10.0, 20.0, 30.0]),
    }
    path = tmp_path / "lps.nrrd"
    nrrd.write(str(path), data, header)
    img = load_volume(path)
    expected = np.array([[-0.5, 0, 0, -10.0], [0, -0.6, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(np.asarray(img.affine), expected, atol=1e-6)
    np.testing.assert_array_equal(img[0].numpy(), data)
    np.testing.assert_allclose(spacing_of(img.affine), [0.5, 0.6, 2.0])


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_missing_path_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        load_volume(tmp_path / "nothere.nii.gz")


def test_non_image_and_truncated_files(tmp_path):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    with pytest.raises(VolumeError, match="notes.nii.gz: cannot read"):
        load_volume(text)
    good = _nifti(tmp_path / "good.nii.gz", np.random.rand(20, 20, 20).astype(np.float32))
    raw = good.read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError, match="trunc.nii.gz"):
        load_volume(trunc)


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8, 2)])
def test_2d_and_4d_are_refused(tmp_path, shape):
    path = _nifti(tmp_path / "bad.nii.gz", np.zeros(shape, dtype=np.float32))
    with pytest.raises(VolumeError, match="bad.nii.gz: expected a 3D volume"):
        load_volume(path)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_and_inf_are_refused(tmp_path, value):
    data = np.zeros((8, 8, 8), dtype=np.float32)
    data[3, 4, 5] = value
    path = _nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(VolumeError, match="nan.nii.gz: 1 voxels are NaN or Inf"):
        load_volume(path)


def test_zero_spacing_is_refused(tmp_path):
    path = tmp_path / "flat.nrrd"
    nrrd.write(
        str(path),
        np.zeros((6, 6, 6), np.int16),
        {"space": "left-posterior-superior", "space directions": np.diag([1.0, 1.0, 0.0]), "space origin": np.zeros(3)},
    )
    with pytest.raises(VolumeError, match="flat.nrrd: invalid voxel spacing"):
        load_volume(path)


def test_save_is_atomic_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(VolumeError):
        save_volume(np.full((4, 4, 4), np.nan), np.eye(4), target)

    def broken_save(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_volume(np.zeros((4, 4, 4)), np.eye(4), target)
    assert list(tmp_path.iterdir()) == []


def test_loading_does_not_modify_the_input(phantom_file):
    before = hashlib.sha256(phantom_file.read_bytes()).hexdigest()
    load_volume(phantom_file)
    assert hashlib.sha256(phantom_file.read_bytes()).hexdigest() == before
    assert gzip.decompress(phantom_file.read_bytes())[:4]  # still a valid gzip stream
