"""All three stages trained in sequence on real crops with tiny networks, then the main job on their weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from scripts.autoencoder import prepare_latents
from scripts.enhance import run
from tests.conftest import ROOT, run_config


def _run(configs: list[str], **overrides) -> ConfigParser:
    return run_config(configs, **overrides)[2]


def test_three_stages_then_enhance(crops, trained, tmp_path):
    ckpt = tmp_path / "models"
    shutil.copytree(trained[0], ckpt, ignore=shutil.ignore_patterns("tb", "*_checkpoint_*"))
    ae = _run(
        ["train_autoencoder.json", "tiny.json"],
        datalist=str(crops / "datalist.json"),
        ckpt_dir=str(ckpt),
        output_dir=str(tmp_path / "tb1"),
        max_epochs=1,
    ).get_parsed_content("autoencoder")
    ae.load_state_dict(torch.load(ckpt / "autoencoder.pt", weights_only=True))
    latents = Path(prepare_latents(ae, str(crops / "datalist.json"), str(tmp_path / "latents"), roi_size=(32, 32, 16)))
    _run(
        ["train_diffusion.json", "tiny.json"],
        datalist=str(latents),
        ckpt_dir=str(ckpt),
        output_dir=str(tmp_path / "tb2"),
        max_epochs=2,
    )
    _run(
        ["train_controlnet.json", "tiny.json"],
        datalist=str(crops / "datalist.json"),
        ckpt_dir=str(ckpt),
        output_dir=str(tmp_path / "tb3"),
        max_epochs=2,
    )
    for name in ("autoencoder.pt", "autoencoder_scale.json", "diffusion.pt", "controlnet.pt"):
        assert (ckpt / name).is_file(), name

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / c) for c in ("inference.json", "inference_diffusion.json", "tiny.json")])
    parser.update({"ckpt_dir": str(ckpt), "device": "cpu"})
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        parser.parse()
        nets = parser.get_parsed_content("networks")
    finally:
        os.chdir(cwd)
    out = tmp_path / "enhanced.nii.gz"
    run(
        str(crops / "c.nii.gz"),
        str(out),
        networks=nets,
        num_inference_steps=3,
        sliding_window={"roi_size": [32, 32, 16], "overlap": 0.25},
    )
    img, ref = nib.load(out), nib.load(crops / "c.nii.gz")
    assert img.shape == ref.shape and img.get_data_dtype() == np.int16
    values = np.asarray(img.dataobj).astype(float)
    assert np.isfinite(values).all() and -1024 <= values.min() and values.max() <= 3071  # the physical HU range
    assert json.loads((ckpt / "autoencoder_scale.json").read_text())["scale_factor"] > 0
