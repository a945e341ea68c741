"""The MONAI Label infer task, driven directly (no server) on a small real volume."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tests.conftest import LATENT

pytest.importorskip("monailabel", reason="install requirements-label.txt (make does)")


def test_infer_task_enhances_the_opened_image(crops, weights, tmp_path):
    from monailabel.interfaces.tasks.infer_v2 import InferTask
    from scripts.label_app.task import EnhanceTask

    task = EnhanceTask(ckpt_dir=str(weights), config_files=LATENT, device="cpu")
    assert isinstance(task, InferTask) and task.is_valid()
    assert task.info()["type"] == "others" and task.info()["dimension"] == 3
    src = tmp_path / "opened.nii.gz"
    shutil.copy(crops / "c.nii.gz", src)
    out, info = task({"image": str(src), "target_spacing": "1.1406,1.1406,2.5", "num_inference_steps": 1})
    try:
        img, ref = nib.load(out), nib.load(src)
        assert img.shape == (64, 64, 32) and info["spacing"] == pytest.approx([1.1406, 1.1406, 2.5], abs=1e-3)
        assert info["modality"] == "ct" and img.get_data_dtype() == np.int16
        np.testing.assert_allclose((img.affine @ [0, 0, -0.5, 1])[:3], (ref.affine @ [0, 0, -0.5, 1])[:3], atol=1e-3)
    finally:
        Path(out).unlink(missing_ok=True)
    missing = EnhanceTask(ckpt_dir=str(tmp_path / "nothing"))
    assert not missing.is_valid()


@pytest.mark.parametrize("problem", ["missing_image", "bad_spacing", "bad_kspace_factor"])
def test_infer_task_answers_bad_input_with_a_422_and_the_reason(crops, weights, tmp_path, problem):
    """The user's image or settings are wrong: HTTP 422 whose detail is the one-line reason, and no output file."""
    from fastapi import HTTPException
    from scripts.label_app.task import EnhanceTask

    task = EnhanceTask(ckpt_dir=str(weights), config_files=LATENT, device="cpu")
    request = {"image": str(crops / "c.nii.gz"), "target_spacing": "1,0,2", "num_inference_steps": 1}
    if problem == "missing_image":
        request.update(image=str(tmp_path / "gone.nii.gz"), target_spacing="")
    if problem == "bad_kspace_factor":
        request.update(target_spacing="", degradation="kspace", kspace_factor="two")
    before = set(Path(tempfile.gettempdir()).glob("*.nii.gz"))
    with pytest.raises(HTTPException) as raised:
        task(request)
    expected = {
        "missing_image": "gone.nii.gz: no such file",
        "bad_spacing": "--target_spacing: must be three",
        "bad_kspace_factor": "kspace_factor: expected numbers, got 1.0, 'two'",
    }
    assert raised.value.status_code == 422 and raised.value.detail.startswith("error: ")
    assert expected[problem] in raised.value.detail
    assert set(Path(tempfile.gettempdir()).glob("*.nii.gz")) == before


def test_infer_task_with_weights_of_another_width_is_invalid_and_says_why(weights, crops, caplog):
    """Tiny weights under the full-size networks of configs/inference.json: ``is_valid()`` is false with the reason
    logged, and a request gets a 422 that names the weights file, not a bare 500."""
    from fastapi import HTTPException
    from scripts.label_app.task import EnhanceTask

    task = EnhanceTask(
        ckpt_dir=str(weights), config_files=("configs/inference.json", "configs/inference_diffusion.json"), device="cpu"
    )
    with caplog.at_level("ERROR"):
        assert not task.is_valid()
    assert "do not fit" in caplog.text
    with pytest.raises(HTTPException) as raised:
        task({"image": str(crops / "c.nii.gz"), "num_inference_steps": 1})
    assert raised.value.status_code == 422 and "do not fit" in raised.value.detail
