"""Low-dose CT from the cache: the stored noise has the level of the projection-domain simulation, and training
pairs built from it carry exactly that noise."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from scripts.degradations import lowdose_ct
from scripts.lowdose_cache import NOISE_KEY, LoadLowDoseNoised, RandCachedLowDoseCTd, build_cache
from scripts.metrics import body_mask
from tests.conftest import ROOT, ct_phantom


def _datalist(tmp_path):
    vol, affine = ct_phantom((64, 64, 8), (0.8, 0.8, 3.0))
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image((vol > -500).astype(np.int16) * 300, affine), tmp_path / "mr.nii.gz")
    entries = [{"image": "ct.nii.gz", "modality": "ct"}, {"image": "mr.nii.gz", "modality": "mr"}]
    (tmp_path / "datalist.json").write_text(json.dumps({"dataroot": str(tmp_path), "training": entries}))
    return vol, affine


def test_cached_noise_has_the_simulated_level(tmp_path):
    vol, affine = _datalist(tmp_path)
    new = build_cache(str(tmp_path / "datalist.json"), str(tmp_path / "cache"), doses=[0.1, 0.5], realizations=1)
    ct, mr = new["training"]
    assert "lowdose" not in mr and [c["dose_fraction"] for c in ct["lowdose"]] == [0.1, 0.5]
    params = json.loads((tmp_path / "cache" / "params.json").read_text())
    assert params["photons"] == 5e5 and params["n_views"] == 360 and len(params["files"]) == 2
    body = body_mask(vol)
    hu = torch.from_numpy(vol)
    for entry in ct["lowdose"]:
        cached = np.load(entry["noise"]).astype(np.float64)
        fresh = (
            lowdose_ct(hu, (0.8, 0.8, 3.0), entry["dose_fraction"], generator=torch.Generator().manual_seed(7)) - hu
        ).numpy()
        ratio = cached[body].std() / fresh[body].std()
        assert 0.9 < ratio < 1.1, (entry, ratio)
        assert abs(cached[body].mean()) < 0.2 * cached[body].std()
    stds = [np.load(e["noise"]).astype(np.float64)[body].std() for e in ct["lowdose"]]
    # noise variance goes as 1/dose - 1 (the input's own full-dose noise is already there)
    assert 0.85 < (stds[0] / stds[1]) ** 2 / ((1 / 0.1 - 1) / (1 / 0.5 - 1)) < 1.15


def test_training_pairs_carry_the_cached_noise(tmp_path):
    _datalist(tmp_path)
    new = build_cache(str(tmp_path / "datalist.json"), str(tmp_path / "cache"), doses=[0.25], realizations=1)
    item = {**new["training"][0], "image": str(tmp_path / "ct.nii.gz")}
    common = ConfigParser.load_config_file(ROOT / "configs" / "common.json")
    parser = ConfigParser(
        {
            **common,
            "ranges": common["degradation_ranges"],
            "photons": 5e5,
            "patch_size": [32, 32, 4],
            "crops_per_volume": 1,
            "degradations": {"ct": "@degradations_ct"},
            "degradations_ct": {"_target_": "scripts.lowdose_cache.RandCachedLowDoseCTd", "keys": "condition"},
        }
    )
    pipeline = parser.get_parsed_content("pair_preprocessing")
    pipeline.set_random_state(0)
    out = pipeline(dict(item))[0]
    assert set(out) >= {"image", "condition"} and NOISE_KEY not in out and "lowdose" not in out
    noise = np.load(new["training"][0]["lowdose"][0]["noise"]).astype(np.float32) / 2000.0  # CT_SCALE
    diff = (out["condition"] - out["image"])[0].numpy()
    # the pair's difference is a crop of the cached noise (same crop as the image)
    found = any(
        np.allclose(diff, noise[i : i + 32, j : j + 32, k : k + 4], atol=1e-6)
        for i in range(33)
        for j in range(33)
        for k in range(5)
    )
    assert found


def test_without_a_cache_low_dose_is_simulated():
    vol, affine = ct_phantom((48, 48, 2), (0.8, 0.8, 3.0))
    from monai.data import MetaTensor

    img = MetaTensor(torch.from_numpy(vol)[None], affine=torch.from_numpy(affine))
    t = RandCachedLowDoseCTd("condition", (0.25, 0.25))
    t.set_random_state(0)
    out = t(LoadLowDoseNoised("condition")({"condition": img}))
    assert float((out["condition"] - img).std()) > 1.0
    assert out["degradation"][0]["name"] == "RandCachedLowDoseCTd" and "cached" not in out["degradation"][0]
