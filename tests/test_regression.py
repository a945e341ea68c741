"""The supervised regression peer: trained on the same on-the-fly pairs, run through the same contract."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import torch

from tests.conftest import ROOT, tracked_training
from tests.test_pipeline import _run


def test_regression_peer_trains_and_enhances(crops, tmp_path):
    ckpt = tmp_path / "models"
    parser = _run(["train_regression.json", "tiny.json"], datalist=str(crops / "datalist.json"), ckpt_dir=str(ckpt),
                  output_dir=str(tmp_path / "tb"), max_epochs=2)
    assert parser.get_parsed_content("train#trainer").state.iteration == 12
    assert set(torch.load(ckpt / "regression.pt", weights_only=True)) == set(
        parser.get_parsed_content("regression").state_dict())
    out = tmp_path / "reg.nii.gz"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           "['configs/inference.json','configs/inference_regression.json','configs/tiny.json']",
           "--input_image", str(crops / "c.nii.gz"), "--output_image", str(out), "--ckpt_dir", str(ckpt),
           "--target_spacing", "[1.1406, 1.1406, 2.5]", "--device", "cpu"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    img = nib.load(out)
    assert img.shape == (64, 64, 32) and img.get_data_dtype() == np.int16


def test_regression_training_with_mlflow(crops, tmp_path):
    run, artifacts = tracked_training("train_regression.json", crops, tmp_path)
    assert {"train_loss", "val_l1"} <= set(run.data.metrics) and run.data.params["max_epochs"] == "1"
    assert {"regression_checkpoint_final.pt", "regression.pt"} <= artifacts
