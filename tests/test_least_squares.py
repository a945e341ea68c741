"""Known-kernel deblurring (``scripts.least_squares``): the main job's first step for ``--degradation blur`` and
the deblurring network's training pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scripts.degradations import blur
from scripts.errors import InputError
from scripts.least_squares import RandBlurLeastSquaresd, deblur
from tests.conftest import ROOT, ct_phantom


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("kernel, size_mm", [("gaussian", 1.0), ("box", 2.0)])
def test_deblur_undoes_much_of_a_known_blur(kernel, size_mm):
    vol, affine = ct_phantom()
    x = torch.as_tensor(vol)
    spacing = np.diag(affine)[:3]
    blurred = blur(x, size_mm, spacing, kernel)
    restored = deblur(blurred, spacing, size_mm, kernel)
    assert _rmse(restored, x) < 0.75 * _rmse(blurred, x)
    with pytest.raises(ValueError, match="blur kernel must be one of gaussian, box"):
        deblur(blurred, spacing, size_mm, "disk")


def test_blur_pairs_are_least_squares_of_a_blurred_crop_and_seeded():
    """``RandBlurLeastSquaresd`` (``configs/train_restoration_ct_blur.json``'s ``crop_condition``): the condition
    is the least squares of the crop's own blur, the target is left alone, and a seed gives the same pair."""
    vol, affine = ct_phantom()
    image = MetaTensor(torch.as_tensor(vol)[None], affine=torch.as_tensor(affine))
    item = {"image": image, "condition": image.clone()}
    make = RandBlurLeastSquaresd(size_mm_range=(1.0, 1.0), kernels=["gaussian"])
    first = make.set_random_state(3)(item)
    assert first["image"] is image and isinstance(first["condition"], MetaTensor)
    spacing = np.diag(affine)[:3]
    blurred = blur(image.as_tensor(), 1.0, spacing)
    torch.testing.assert_close(first["condition"].as_tensor(), deblur(blurred, spacing, 1.0))
    assert _rmse(first["condition"], image) < _rmse(blurred, image.as_tensor())
    drawn = RandBlurLeastSquaresd(size_mm_range=(0.5, 2.0))
    a, b = (drawn.set_random_state(7)(item)["condition"] for _ in range(2))
    torch.testing.assert_close(a, b)


def test_the_blur_override_trains_on_deblurring_pairs():
    """``configs/train_restoration_ct_blur.json``: CT only, its own weights file, the blur made and undone on each
    crop; the main job loads that file for ``--degradation blur``."""
    parser = ConfigParser()
    names = ["train_regression.json", "train_restoration.json", "train_restoration_ct_blur.json"]
    parser.read_config([str(ROOT / "configs" / n) for n in names])
    assert parser.get_parsed_content("weights_file") == "restoration_ct_blur.pt"
    assert parser["modalities"] == ["ct"]
    assert type(parser.get_parsed_content("crop_condition")).__name__ == "RandBlurLeastSquaresd"
    assert type(parser.get_parsed_content("degradations#ct")).__name__ == "Identityd"
    plain = ConfigParser()
    plain.read_config([str(ROOT / "configs" / n) for n in names[:2]])
    assert type(plain.get_parsed_content("crop_condition")).__name__ == "Identityd"
    inference = ConfigParser.load_config_file(ROOT / "configs" / "inference.json")
    assert "restoration_ct_blur.pt" in inference["restoration"]["ct_blur"]


def test_main_job_blur_runs_least_squares_before_its_network():
    """``--degradation blur``: with an identity network the output is the known kernel's least squares of the
    input; a kernel the bundle does not know is a clear error."""
    from scripts.enhance import enhance_volume

    vol, affine = ct_phantom()
    spacing = np.diag(affine)[:3]
    truth = torch.as_tensor(vol)
    image = MetaTensor(blur(truth, 1.0, spacing)[None], affine=torch.as_tensor(affine))
    nets = {"regression": torch.nn.Identity(), "restoration": {"ct_blur": torch.nn.Identity()}}
    kw = {"modality": "ct", "method": "regression", "progress": False, "sliding_window": {"roi_size": [48, 48, 12]}}
    out = enhance_volume(image, nets, degradation="blur", sigma_mm=1.0, **kw)[0]
    assert _rmse(out, truth) < 0.75 * _rmse(image[0], truth)
    with pytest.raises(InputError, match="--kernel, --sigma_mm: a blur is gaussian or box"):
        enhance_volume(image, nets, degradation="blur", kernel="disk", **kw)
    with pytest.raises(InputError, match="no CT network for it"):
        enhance_volume(image, {"regression": torch.nn.Identity()}, degradation="blur", **kw)
