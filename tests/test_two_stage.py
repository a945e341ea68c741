"""The two-stage chain (DiffBIR-style): the regression network first, then the ControlNet on its output."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scripts.enhance import enhance_volume
from scripts.trainers import controlnet_inputs
from tests.conftest import ROOT
from tests.test_inference import bundle


def _with_regression(weights, tmp_path):
    ckpt = tmp_path / "models"
    shutil.copytree(weights, ckpt)
    tiny = ConfigParser(json.loads((ROOT / "configs" / "tiny.json").read_text()))
    torch.manual_seed(3)
    torch.save(tiny.get_parsed_content("regression_def").state_dict(), ckpt / "model.pt")
    return ckpt


def test_two_stage_main_job_keeps_the_contract(crops, weights, tmp_path):
    """SR and denoising through ``monai.bundle run`` with ``--two_stage true``: grid, affine and units kept."""
    ckpt = _with_regression(weights, tmp_path)
    src = crops / "c.nii.gz"
    ref = nib.load(src)
    for spacing, shape in ((None, ref.shape), ("[1.1406,1.1406,2.5]", (64, 64, 32))):
        out = tmp_path / f"two_stage_{shape[2]}.nii.gz"
        res = bundle(
            "--input_image",
            str(src),
            "--output_image",
            str(out),
            "--ckpt_dir",
            str(ckpt),
            "--device",
            "cpu",
            "--num_inference_steps",
            "2",
            "--two_stage",
            "true",
            *(["--target_spacing", spacing] if spacing else []),
        )
        assert res.returncode == 0, res.stderr[-3000:]
        img = nib.load(out)
        assert img.shape == shape and img.get_data_dtype() == np.int16
        if spacing is None:
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)


def test_the_chain_conditions_on_the_regression_output(weights, tmp_path):
    """With a regression network in ``networks`` the residual-decoding base is its output: an autoencoder and
    a sampler that change nothing return the regression output itself (here the input plus a constant)."""
    ckpt = _with_regression(weights, tmp_path)
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / c) for c in ("inference.json", "inference_diffusion.json", "tiny.json")])
    parser.update({"bundle_root": str(ROOT), "ckpt_dir": str(ckpt), "device": "cpu", "two_stage": True})
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        networks = parser.get_parsed_content("networks")
    finally:
        os.chdir(cwd)
    assert networks["regression"] is not None

    class Shift(torch.nn.Module):
        def forward(self, x):
            return x + 0.05  # 100 HU in CT units

    networks["regression"] = Shift()
    vol = torch.full((1, 32, 32, 16), -200.0)
    image = MetaTensor(vol, affine=torch.eye(4))
    common = {
        "modality": "ct",
        "num_inference_steps": 1,
        "progress": False,
        "strength": 0.5,
        "residual_decoding": True,
        "sliding_window": {"roi_size": [32, 32, 16], "overlap": 0.25, "sampling_overlap": 0.5},
    }
    out = enhance_volume(image, networks, **common)[0]
    # residual decoding returns r + D(z) - D(E(r)); the tiny sampler's change is small against the 100 HU shift
    assert abs(float(out.mean()) - (-100.0)) < abs(float(out.mean()) - (-200.0))


def test_controlnet_pairs_are_regression_output_and_reference():
    stage_a = torch.nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        stage_a.weight.fill_(0.0)
        stage_a.bias.fill_(0.25)
    ae = (
        ConfigParser({"n": json.loads((ROOT / "configs" / "tiny.json").read_text())["autoencoder_def"]})
        .get_parsed_content("n")
        .eval()
    )
    batch = {"image": torch.rand(1, 1, 16, 16, 8), "condition": torch.rand(1, 1, 16, 16, 8)}
    from monai.networks.schedulers import DDPMScheduler

    *_, condition = controlnet_inputs(batch, torch.device("cpu"), ae, DDPMScheduler(1000), 1.0, stage_a=stage_a)
    torch.testing.assert_close(condition, torch.full_like(condition, 0.25), atol=2e-3, rtol=0)


def test_controlnet_trains_two_stage_with_the_frozen_regression_network(crops, weights, tmp_path):
    ckpt = _with_regression(weights, tmp_path)
    (ckpt / "controlnet.pt").unlink()
    before = torch.load(ckpt / "model.pt", weights_only=True)
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train_controlnet.json"), str(ROOT / "configs" / "tiny.json")])
    parser.update(
        {
            "bundle_root": str(ROOT),
            "datalist": str(crops / "datalist.json"),
            "ckpt_dir": str(ckpt),
            "output_dir": str(tmp_path / "tb"),
            "max_epochs": 1,
            "two_stage": True,
        }
    )
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        parser.parse()
        assert parser.get_parsed_content("train#trainer").stage_a is not None
        parser.get_parsed_content("initialize")
        parser.get_parsed_content("run")
        after = parser.get_parsed_content("stage_a").state_dict()
    finally:
        os.chdir(cwd)
    assert (ckpt / "controlnet.pt").is_file()
    assert all(torch.equal(after[k].cpu(), v) for k, v in before.items())  # stage A stays frozen


def test_results_rows_of_the_chain_come_from_its_own_ckpt_dir(crops, weights, tmp_path):
    """The results table's two-stage rows load the chain from ``two_stage_ckpt_dir`` (its ControlNet is trained on
    the regression output) at the main job's defaults: one sample, and the mean of ``num_samples``."""
    from scripts.results import run

    ckpt = _with_regression(weights, tmp_path)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"validation": [{"image": str(crops / "c.nii.gz"), "modality": "ct"}]}))
    out = tmp_path / "results"
    summary = run(
        str(datalist),
        str(tmp_path / "no_weights"),
        str(out),
        ["configs/tiny.json"],
        ["ct_sr_5to10mm"],
        methods=["two-stage", "two-stage mean"],
        num_inference_steps=2,
        num_samples=2,
        two_stage_ckpt_dir=str(ckpt),
    )
    label = "strength 0.5 + residual decoding + data consistency"
    metrics = summary["cases"]["c/ct_sr_5to10mm"]["metrics"]
    assert set(metrics) == {f"two-stage, {label}", f"two-stage mean of 2, {label}"}
    assert all(np.isfinite(m["psnr"]) for m in metrics.values())
    task = out / "c" / "ct_sr_5to10mm"
    one, mean = (
        nib.load(task / f"two_stage{m}_strength_0_5_plus_residual_decoding_plus_data_consistency.nii.gz")
        for m in ("", "_mean_of_2")
    )
    assert one.shape == mean.shape == nib.load(task / "reference.nii.gz").shape
    assert not np.allclose(one.get_fdata(), mean.get_fdata())  # the mean holds a second sample
    assert (task / "ct_sr_5to10mm.png").stat().st_size > 0
