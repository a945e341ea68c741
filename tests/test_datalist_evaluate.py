"""Patient-wise datalists and the evaluation report."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scripts.datalist import make_datalist, patch_fill, read_datalist, split_regions
from scripts.evaluate import evaluate
from scripts.volumes import VolumeError
from tests.conftest import ct_phantom
from tests.test_dicom import make_series


def _touch_nifti(path, value=0.0):
    vol, affine = ct_phantom(shape=(16, 16, 12))
    nib.save(nib.Nifti1Image((vol + value).astype(np.float32), affine), path)
    return path


def test_split_keeps_each_patient_in_one_list(tmp_path):
    for patient in range(10):
        for visit in range(3):
            _touch_nifti(tmp_path / f"pat{patient:02d}_visit{visit}.nii.gz")
    out = tmp_path / "datalist.json"
    dl = make_datalist(
        str(tmp_path),
        str(out),
        patient_pattern=r"(?P<patient>pat\d+)_",
        val_fraction=0.2,
        test_fraction=0.2,
        num_folds=3,
        seed=1,
    )
    assert json.loads(out.read_text()) == dl
    groups = {k: {e["patient"] for e in dl[k]} for k in ("training", "validation", "testing")}
    assert [len(groups[k]) for k in ("training", "validation", "testing")] == [6, 2, 2]
    assert not (
        groups["training"] & groups["validation"]
        or groups["training"] & groups["testing"]
        or groups["validation"] & groups["testing"]
    )
    folds = {}
    for e in dl["training"]:
        folds.setdefault(e["patient"], set()).add(e["fold"])
    assert all(len(f) == 1 for f in folds.values())  # a patient's visits share one fold
    items = read_datalist(str(out), "training")
    assert len(items) == 18 and all(str(tmp_path) in i["image"] for i in items)


def test_dicom_folders_use_patient_id(tmp_path):
    make_series(tmp_path / "a", n=2)
    make_series(tmp_path / "b", n=2)
    dl = make_datalist(str(tmp_path), str(tmp_path / "dl.json"), val_fraction=0.0)
    # both folders are copies of the same real patient, so they must stay together
    assert len({e["patient"] for e in dl["training"]}) == 1 and len(dl["training"]) == 2


def test_bad_datalists_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json: datalist not found"):
        read_datalist(str(tmp_path / "missing.json"))
    (tmp_path / "empty.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="'training' list is missing or empty"):
        read_datalist(str(tmp_path / "empty.json"))
    (tmp_path / "gone.json").write_text(json.dumps({"training": [{"image": "nothere.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz listed in 'training' does not exist"):
        read_datalist(str(tmp_path / "gone.json"))


def test_region_split_holds_out_the_top_of_the_anatomy_with_a_gap(tmp_path):
    vol, affine = ct_phantom(shape=(40, 40, 30), spacing=(1.0, 1.0, 2.0))
    vol[:, :, 24:] = -1000.0  # air above the body: not validation data
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), tmp_path / "ct.nii.gz")
    dl = split_regions(str(tmp_path), str(tmp_path / "regions"), {"ct.nii.gz": "ct"}, val_fraction=0.25, gap_mm=4.0)
    assert [e["slices"] for e in dl["training"]] == [[0, 16]]  # 24 body slices: 6 validate, 2 (4 mm) gap
    assert [e["slices"] for e in dl["validation"]] == [[18, 24]]
    for key, start in (("training", 0), ("validation", 18)):
        (item,) = read_datalist(str(tmp_path / "regions" / "datalist.json"), key)
        assert item["modality"] == "ct"
        img = nib.load(item["image"])
        np.testing.assert_allclose(img.affine[:3, 3], (affine @ [0, 0, start, 1])[:3])  # world position kept
        np.testing.assert_array_equal(np.asarray(img.dataobj), vol[:, :, start : start + img.shape[2]])
    with pytest.raises(ValueError, match="too few"):
        split_regions(str(tmp_path), str(tmp_path / "r2"), {"ct.nii.gz": "ct"}, val_fraction=0.5, gap_mm=40.0)
    # copied with its data to another machine, whose absolute dataroot does not exist there, it still reads
    moved = tmp_path / "elsewhere"
    (tmp_path / "regions").rename(moved)
    (item,) = read_datalist(str(moved / "datalist.json"), "training")
    assert item["image"] == str(moved / "ct_training.nii.gz")
    (tmp_path / "elsewhere").rename(tmp_path / "regions")
    # the 40x40x16 training slab fills a 32x32x32 patch to half its depth, the 6-slice validation slab to 3/16
    fills = {
        k: patch_fill(str(tmp_path / "regions" / "datalist.json"), (32, 32, 32), k) for k in ("training", "validation")
    }
    assert fills == {
        "training": {"ct_training.nii.gz": ((40, 40, 16), 0.5)},
        "validation": {"ct_validation.nii.gz": ((40, 40, 6), 6 / 32)},
    }


def test_evaluate_writes_json_csv_and_montages(tmp_path):
    ref = _touch_nifti(tmp_path / "ref.nii.gz")
    good = _touch_nifti(tmp_path / "good.nii.gz", 5.0)
    bad = _touch_nifti(tmp_path / "bad.nii.gz", 50.0)
    cases = [
        {"name": "a", "method": "good", "output": str(good), "reference": str(ref), "input": str(bad)},
        {"name": "b", "method": "bad", "output": str(bad), "reference": str(ref)},
    ]
    report = evaluate(cases, str(tmp_path / "eval"), "ct")
    assert report["mean_by_method"]["good"]["mae"] == pytest.approx(5.0, rel=1e-5)
    assert report["mean_by_method"]["good"]["psnr"] > report["mean_by_method"]["bad"]["psnr"]
    rows = list(csv.DictReader(open(tmp_path / "eval" / "report.csv")))
    assert [r["name"] for r in rows] == ["a", "b"]
    assert (tmp_path / "eval" / "a.png").stat().st_size > 10_000


def test_evaluate_refuses_mismatched_grids(tmp_path):
    ref = _touch_nifti(tmp_path / "ref.nii.gz")
    vol, affine = ct_phantom(shape=(16, 16, 6))
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "thick.nii.gz")
    with pytest.raises(VolumeError, match="does not match reference"):
        evaluate([{"output": str(tmp_path / "thick.nii.gz"), "reference": str(ref)}], str(tmp_path / "e"))


def test_training_curves_from_tensorboard_logs(tmp_path):
    from scripts.figures import training_curves
    from torch.utils.tensorboard import SummaryWriter

    for run, tags in {"ae": ("loss", "val_psnr"), "prior": ("train_loss", "val_noise_mse")}.items():
        writer = SummaryWriter(str(tmp_path / run))
        for step in range(1, 41):
            writer.add_scalar(tags[0], 1.0 / step, step)
        for epoch in range(1, 5):
            writer.add_scalar(tags[1], float(epoch), epoch)
        writer.close()
    out = training_curves({"ae": tmp_path / "ae", "prior": tmp_path / "prior"}, tmp_path / "curves.png")
    assert out.endswith("curves.png") and (tmp_path / "curves.png").stat().st_size > 10_000
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no training loss"):
        training_curves({"x": tmp_path / "empty"}, tmp_path / "bad.png")


def test_a_specialist_reads_only_its_modality_from_a_mixed_datalist():
    from scripts.datalist import only_modalities
    from scripts.errors import InputError

    entries = [{"image": "a", "modality": "ct"}, {"image": "b", "modality": "mr"}, {"image": "c"}]
    assert [e["image"] for e in only_modalities(entries, ["ct"], default="ct")] == ["a", "c"]
    assert [e["image"] for e in only_modalities(entries, ["mr"], default="ct")] == ["b"]
    assert only_modalities(entries, None) == entries
    with pytest.raises(InputError, match="no mr volume"):
        only_modalities(entries[:1], ["mr"])
