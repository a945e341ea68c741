"""Degradation operators and transforms against known answers on small synthetic phantoms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CopyItemsd
from scripts.baselines import resample
from scripts.degradations import (
    MU_WATER_PER_MM,
    ByModalityd,
    RandBlurd,
    RandKSpaceTruncated,
    RandLowDoseCTd,
    RandRicianNoised,
    RandThickSliced,
    blur,
    kspace_truncate,
    lowdose_ct,
    lowdose_sinogram_noise,
    rician_noise,
    thick_slice,
    thick_slice_affine,
    thick_slice_matrix,
)
from scripts.grid import FWHM_TO_SIGMA
from scripts.radon import fbp, radon
from tests.conftest import ct_phantom


def test_integer_thick_slices_are_means_of_their_thin_slices():
    x = torch.rand(5, 6, 12, dtype=torch.float64)
    y = thick_slice(x, 3, axis=2, profile="box")
    assert y.shape == (5, 6, 4)
    for k in range(4):
        torch.testing.assert_close(y[..., k], x[..., 3 * k : 3 * k + 3].mean(-1))


def test_thick_slices_along_another_axis():
    x = torch.rand(1, 8, 5, 3, dtype=torch.float64)
    y = thick_slice(x, 2, axis=0)
    assert y.shape == (1, 4, 5, 3)
    torch.testing.assert_close(y[0, 1], x[0, 2:4].mean(0))


def test_non_integer_factor_uses_partial_voxels():
    m = thick_slice_matrix(10, 2.5, "box")
    assert m.shape == (4, 10)
    np.testing.assert_allclose(m[0, :4], [0.4, 0.4, 0.2, 0.0])
    np.testing.assert_allclose(m[1, 2:5], [0.2, 0.4, 0.4])
    np.testing.assert_allclose(m.sum(1), 1.0)


def test_gaussian_profile_has_the_slice_thickness_as_fwhm():
    m = thick_slice_matrix(64, 4.0, "gaussian")
    row = m[8]
    centre = (8 + 0.5) * 4 - 0.5
    idx = np.arange(64)
    assert abs((row * idx).sum() - centre) < 1e-9
    var = (row * (idx - centre) ** 2).sum()
    # a Gaussian of FWHM 4 integrated over unit voxels: variance sigma^2 + 1/12
    assert var == pytest.approx((4 * FWHM_TO_SIGMA) ** 2 + 1 / 12, rel=1e-3)


def test_thick_slice_affine_centres_each_slab_on_its_thin_slices():
    _, affine = ct_phantom()
    thick_aff = thick_slice_affine(affine, 12, 3, axis=2)
    for k in range(4):
        thin_centres = [affine @ np.array([2, 3, m, 1.0]) for m in range(3 * k, 3 * k + 3)]
        np.testing.assert_allclose(thick_aff @ np.array([2, 3, k, 1.0]), np.mean(thin_centres, axis=0))
    np.testing.assert_allclose(np.linalg.norm(thick_aff[:3, 2]), 3 * np.linalg.norm(affine[:3, 2]))


@pytest.mark.parametrize("method", ["trilinear", "bspline"])
def test_upsampling_back_uses_the_same_grid(method):
    vol, affine = ct_phantom()
    x = torch.as_tensor(vol)
    thick = thick_slice(x, 2, axis=2)
    thick_aff = thick_slice_affine(affine, x.shape[-1], 2, axis=2)
    up, up_aff = resample(thick, thick_aff, [1.0, 1.0, 2.0], method)
    assert up.shape == x.shape
    np.testing.assert_allclose(up_aff, affine, atol=1e-9)
    # each thick slice maps onto exactly two thin ones, so a z-constant volume comes back exactly
    const = torch.ones(4, 4, 12) * 7
    back, _ = resample(thick_slice(const, 2), thick_aff, [1.0, 1.0, 2.0], method)
    torch.testing.assert_close(back, const)


def test_non_integer_target_spacing():
    x = torch.rand(4, 4, 10)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    y, aff = resample(x, affine, [1.0, 1.0, 1.25], "trilinear")
    assert y.shape[-1] == 24
    np.testing.assert_allclose(np.linalg.norm(aff[:3, 2]), 1.25)
    # first output voxel's low edge sits on the input's low edge (FOV preserved)
    np.testing.assert_allclose(aff[2, 3] - 1.25 / 2, affine[2, 3] - 3.0 / 2)


def test_rician_noise_matches_theory():
    gen = torch.Generator().manual_seed(0)
    sigma = 2.0
    background = rician_noise(torch.zeros(200_000, dtype=torch.float64), sigma, gen)
    assert background.mean().item() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.01)
    bright = rician_noise(torch.full((200_000,), 100.0, dtype=torch.float64), sigma, gen)
    assert bright.std().item() == pytest.approx(sigma, rel=0.02)
    assert bright.mean().item() == pytest.approx(math.sqrt(100**2 + sigma**2), rel=1e-3)


def test_kspace_truncation_keeps_low_and_removes_high_frequencies():
    n = 64
    i = torch.arange(n, dtype=torch.float64)
    low = torch.cos(2 * math.pi * 3 * i / n)
    high = torch.cos(2 * math.pi * 20 * i / n)
    along_z = torch.cos(2 * math.pi * 20 * torch.arange(8, dtype=torch.float64) / 8 * 0.25)
    x = (low + high)[:, None, None] + torch.zeros(n, 4, 8, dtype=torch.float64) + along_z
    y = kspace_truncate(x, factor=2, axes=(0, 1))
    torch.testing.assert_close(y, low[:, None, None] + along_z + torch.zeros(n, 4, 8, dtype=torch.float64))


def test_blur_has_the_requested_size_in_mm():
    x = torch.zeros(41, 3, 3, dtype=torch.float64)
    x[20] = 1.0
    y = blur(x, [1.5, 0, 0], spacing=[0.5, 1, 1], kernel="gaussian")[:, 1, 1]
    pos = (torch.arange(41, dtype=torch.float64) - 20) * 0.5
    assert y.sum().item() == pytest.approx(1.0)
    # Gaussian integrated over 0.5 mm voxels: variance sigma^2 + 0.5^2 / 12
    assert (y * pos**2).sum().item() == pytest.approx(1.5**2 + 0.25 / 12, rel=1e-3)
    box = blur(x, [2.0, 0, 0], spacing=[0.5, 1, 1], kernel="box")[:, 1, 1]
    np.testing.assert_allclose(box[18:23].numpy(), [0.125, 0.25, 0.25, 0.25, 0.125])


def test_blur_as_shifted_sums_matches_a_convolution():
    """``blur`` sums shifted views (fast on a CPU); it is the replicate-padded convolution it replaced."""
    import torch.nn.functional as F
    from scripts.degradations import _convolve_axis

    x = torch.randn(2, 9, 7, 5, dtype=torch.float64)
    taps = np.array([0.1, 0.5, 0.3, 0.05, 0.05])  # not symmetric: the orientation counts
    for dim in (1, 2, 3):
        moved = torch.movedim(x, dim, -1)
        flat = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (2, 2), mode="replicate")
        ref = F.conv1d(flat, torch.as_tensor(taps).flip(0)[None, None]).reshape(moved.shape)
        torch.testing.assert_close(_convolve_axis(x, taps, dim), torch.movedim(ref, -1, dim))


def test_fbp_inverts_radon_on_a_disk():
    h = w = 64
    yy, xx = torch.meshgrid(torch.arange(h) - 31.5, torch.arange(w) - 31.5, indexing="ij")
    disk = ((xx**2 + yy**2) < 25**2).double() * MU_WATER_PER_MM
    sino = radon(disk[None], 0.8, 180)
    assert sino.max().item() == pytest.approx(50 * 0.8 * MU_WATER_PER_MM, rel=0.03)  # chord through the centre
    rec = fbp(sino, 0.8, h, w)[0]
    inner = (xx**2 + yy**2) < 20**2
    assert (rec - disk)[inner].abs().mean().item() < 0.01 * MU_WATER_PER_MM


def test_sinogram_noise_variance_matches_theory():
    p = torch.full((4, 180, 100), 2.0, dtype=torch.float64)
    photons, dose = 1e4, 0.25
    noise = lowdose_sinogram_noise(p, dose, photons, torch.Generator().manual_seed(1))
    expected = (1 / dose - 1) * math.exp(2.0) / photons
    assert noise.var().item() == pytest.approx(expected, rel=0.05)
    assert abs(noise.mean().item()) < 0.05 * math.sqrt(expected)


def test_lowdose_image_noise_scales_with_dose_and_is_added_only():
    vol, affine = ct_phantom(shape=(64, 64, 4), spacing=(1.0, 1.0, 2.0))
    x = torch.as_tensor(vol)

    def noise_std(dose, seed):
        y = lowdose_ct(
            x, [1, 1, 2], dose_fraction=dose, photons=2e4, n_views=180, generator=torch.Generator().manual_seed(seed)
        )
        return (y - x)[24:40, 24:40].std().item(), y

    s_half, _ = noise_std(0.5, 0)
    s_quarter, y = noise_std(0.25, 1)
    # added variance is proportional to 1/dose - 1: (4 - 1) / (2 - 1) = 3
    assert s_quarter / s_half == pytest.approx(math.sqrt(3), rel=0.12)
    assert abs((y - x)[24:40, 24:40].mean().item()) < 0.2 * s_quarter
    assert lowdose_ct(x, [1, 1, 2], dose_fraction=1.0, n_views=90).sub(x).abs().max().item() < 1e-3


def _meta(vol, affine):
    return MetaTensor(torch.as_tensor(vol)[None], affine=torch.as_tensor(affine))


def test_transforms_make_seeded_pairs_and_record_parameters():
    vol, affine = ct_phantom(shape=(32, 32, 12))
    pipeline = Compose(
        [
            CopyItemsd(keys="image", names="degraded"),
            RandThickSliced("degraded", factor_range=(2, 4)),
            RandLowDoseCTd("degraded", dose_range=(0.2, 0.3), n_views=90),
            RandBlurd("degraded", size_mm_range=(0.5, 1.0)),
        ]
    ).set_random_state(3)
    out1 = pipeline({"image": _meta(vol, affine)})
    pipeline.set_random_state(3)
    out2 = pipeline({"image": _meta(vol, affine)})
    torch.testing.assert_close(out1["degraded"], out2["degraded"])
    assert out1["degraded"].shape == out1["image"].shape
    np.testing.assert_allclose(np.asarray(out1["degraded"].affine), affine)
    names = [d["name"] for d in out1["degradation"]]
    assert names == ["RandThickSliced", "RandLowDoseCTd", "RandBlurd"]
    assert 2 <= out1["degradation"][0]["factor"] <= 4
    torch.testing.assert_close(out1["image"], _meta(vol, affine))  # the clean image is untouched


def test_thick_transform_without_resampling_updates_the_affine():
    vol, affine = ct_phantom(shape=(16, 16, 12))
    t = RandThickSliced("image", factor_range=(3, 3), profiles=["box"], resample_back=False)
    out = t({"image": _meta(vol, affine)})["image"]
    assert out.shape == (1, 16, 16, 4)
    np.testing.assert_allclose(np.asarray(out.affine), thick_slice_affine(affine, 12, 3))


def test_mixed_datalist_items_get_the_degradations_of_their_modality():
    vol, affine = ct_phantom(shape=(32, 32, 8))
    by_modality = ByModalityd(
        "image",
        {"ct": RandLowDoseCTd("image", (0.25, 0.25), n_views=60), "mr": RandRicianNoised("image", (0.05, 0.05))},
        default_modality="ct",
    )
    pipeline = Compose([by_modality]).set_random_state(1)
    ct = pipeline({"image": _meta(vol, affine)})  # no modality entry: the default
    mr = pipeline({"image": _meta(vol + 1000.0, affine), "modality": "MR"})
    assert [d["name"] for d in ct["degradation"]] == ["RandLowDoseCTd"]
    assert [d["name"] for d in mr["degradation"]] == ["RandRicianNoised"]
    pipeline.set_random_state(1)
    torch.testing.assert_close(pipeline({"image": _meta(vol, affine)})["image"], ct["image"])  # seeded
    with pytest.raises(ValueError, match="no degradations for modality 'pet'"):
        by_modality({"image": _meta(vol, affine), "modality": "pet"})


def test_mr_transforms_keep_the_grid():
    vol = np.random.RandomState(0).rand(16, 16, 8).astype(np.float32) * 100
    d = {"image": _meta(vol, np.eye(4))}
    out = Compose([RandKSpaceTruncated("image", (2, 2)), RandRicianNoised("image", (0.05, 0.05))])(d)
    assert out["image"].shape == (1, 16, 16, 8)
    assert (out["image"] >= 0).all()


@pytest.mark.parametrize(
    "op",
    [
        lambda x: thick_slice(x, 2.5, axis=2, profile="gaussian"),
        lambda x: blur(x, 1.0, [1.0, 1.0, 2.0], "gaussian"),
        lambda x: kspace_truncate(x, 2.0),
    ],
)
def test_linear_operators_have_gradients_and_adjoints(op):
    x = torch.rand(6, 5, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (x,))
    # <A x, y> == <x, A^T y> with A^T from autograd's vector-Jacobian product
    y = torch.rand_like(op(x))
    (at_y,) = torch.autograd.grad(op(x), x, y)
    assert torch.dot(op(x).flatten(), y.flatten()).item() == pytest.approx(
        torch.dot(x.flatten(), at_y.flatten()).item()
    )
