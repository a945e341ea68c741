"""Metrics against hand-computed values, and the classical baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric
from scripts.baselines import gaussian_denoise, nlm_denoise
from scripts.metrics import ScoreMetric, body_mask, mae, mr_scale, psnr, score, ssim
from tests.conftest import ct_phantom


def _cylinder(shape):
    """The phantom's body, drawn independently of ``body_mask``."""
    x, y, _ = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    return x**2 + y**2 < (min(shape[:2]) * 0.42) ** 2


def test_psnr_by_hand():
    ref = np.zeros((4, 4, 4))
    pred = ref + 10.0  # MSE 100
    assert psnr(pred, ref, data_range=1000.0) == pytest.approx(10 * math.log10(1000.0**2 / 100))
    assert psnr(ref, ref, 1.0) == float("inf")


def test_ssim_by_hand_on_constant_volumes():
    a, b, data_range = 0.6, 0.4, 1.0
    c1 = (0.01 * data_range) ** 2
    expected = (2 * a * b + c1) / (a**2 + b**2 + c1)  # variances are zero: the contrast term is 1
    got = ssim(np.full((12, 12, 12), a), np.full((12, 12, 12), b), data_range)
    assert got == pytest.approx(expected, rel=1e-5)
    x = np.random.RandomState(0).rand(12, 12, 12)
    assert ssim(x, x, 1.0) == pytest.approx(1.0)
    noisy = x + 0.3 * np.random.RandomState(1).rand(12, 12, 12)
    monai_value = SSIMMetric(spatial_dims=3, data_range=1.0)(
        torch.as_tensor(noisy)[None, None], torch.as_tensor(x)[None, None]
    )
    assert ssim(noisy, x, 1.0) == pytest.approx(float(monai_value.mean()), abs=1e-4)
    assert ssim(noisy, x, 1.0) < 0.95


def test_mae_with_and_without_mask():
    ref = np.zeros((2, 2, 2))
    pred = np.arange(8, dtype=float).reshape(2, 2, 2)
    assert mae(pred, ref) == pytest.approx(3.5)
    mask = np.zeros((2, 2, 2), bool)
    mask[1] = True
    assert mae(pred, ref, mask) == pytest.approx((4 + 5 + 6 + 7) / 4)
    with pytest.raises(ValueError, match="empty"):
        mae(pred, ref, np.zeros((2, 2, 2), bool))


def test_body_mask_fills_lungs_and_drops_the_table():
    vol, _ = ct_phantom(shape=(48, 48, 6))
    vol[:, 45:, :] = 200.0  # a separate table under the patient
    m = body_mask(vol)
    np.testing.assert_array_equal(
        m[:, :45], _cylinder(vol.shape)[:, :45]
    )  # lung (-800 HU) inside the body counts as body
    assert not m[:, 45:, :].any()


def test_score_ct_uses_the_window_and_the_body():
    vol, _ = ct_phantom(shape=(24, 24, 12))
    pred = vol.copy()
    pred[_cylinder(vol.shape)] += 10.0  # 10 HU error inside the body (lungs included) only
    s = score(pred, vol, "ct")
    assert s["hu_mae_body"] == pytest.approx(10.0)
    assert s["mae"] < 10.0
    assert s["psnr"] > 40
    with pytest.raises(ValueError, match="shape mismatch"):
        score(pred[:, :, :6], vol, "ct")


def test_score_mr_normalises_and_ignores_the_background():
    ref = np.zeros((24, 24, 12))
    ref[4:20, 4:20] = np.random.RandomState(0).rand(16, 16, 12) * 400 + 100  # a "head" in empty background
    pred = ref * 1.02
    pred[ref == 0] = 30.0  # background errors must not count
    s = score(pred, ref, "mr")
    head = ref > 0
    assert s["mae"] == pytest.approx(0.02 * ref[head].mean() / mr_scale(ref), rel=1e-6)
    assert s["psnr"] == pytest.approx(psnr(pred / mr_scale(ref), ref / mr_scale(ref), 1.0, head))


def test_score_metric_for_evaluators():
    vol, _ = ct_phantom(shape=(24, 24, 12))
    ref = torch.as_tensor(vol)[None, None].repeat(2, 1, 1, 1, 1)
    pred = ref.clone()
    body = torch.as_tensor(_cylinder(vol.shape))[None]
    pred[0][body] += 4.0
    pred[1][body] -= 8.0
    metric = ScoreMetric("hu_mae_body", "ct")
    metric(pred, ref)
    assert metric.aggregate().item() == pytest.approx(6.0)
    psnr_metric = ScoreMetric("psnr", "ct")
    psnr_metric(pred, ref)
    expected = np.mean([score(p, r, "ct")["psnr"] for p, r in zip(pred.numpy(), ref.numpy())])
    assert psnr_metric.aggregate().item() == pytest.approx(expected)


def test_denoising_baselines_reduce_noise():
    _, affine = ct_phantom()
    clean = torch.zeros(48, 48, 6, dtype=torch.float64)
    clean[16:32, 16:32] = 300.0
    noisy = clean + 60.0 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = mae(noisy, clean)
    flat = (slice(2, 12), slice(2, 12))  # away from the edges of the bright block
    smoothed = gaussian_denoise(noisy, affine, 1.0)
    assert (smoothed - clean)[flat].std() < 0.5 * (noisy - clean)[flat].std()
    assert mae(nlm_denoise(noisy), clean) < 0.5 * before


def test_sharpness_ratio_is_one_for_the_truth_below_for_blur_above_for_noise():
    from scipy import ndimage
    from scripts.metrics import score, sharpness_ratio
    from tests.conftest import ct_phantom

    vol, _ = ct_phantom((48, 48, 16))
    blurred = ndimage.gaussian_filter(vol, 1.0)
    noisy = vol + np.random.RandomState(0).normal(0, 100, vol.shape)
    assert sharpness_ratio(vol, vol) == pytest.approx(1.0)
    assert sharpness_ratio(blurred, vol) < 0.7 < 1.3 < sharpness_ratio(noisy, vol)
    assert score(blurred, vol, "ct")["sharpness"] < 1.0


def test_bm4d_rows_follow_the_optional_package(monkeypatch):
    """BM4D is optional: without the package, no BM4D rows; with it (a stand-in module here, as CI lacks the
    non-commercial package), one row per sigma factor, each given ``factor`` times the estimated noise level, and
    ``tuned_best`` keeps the best of them."""
    import sys
    import types

    from scripts import baseline_report, baselines

    torch.manual_seed(0)
    clean = torch.zeros(24, 24, 8)
    noisy = clean + 0.1 * torch.randn_like(clean)
    affine = np.eye(4)
    monkeypatch.setattr(baseline_report, "bm4d_available", lambda: False)
    assert not any(m.startswith("bm4d") for m in baseline_report.restore_all("mr_rician4", noisy, affine, [1, 1, 1]))
    seen = []
    fake = types.SimpleNamespace(bm4d=lambda v, sigma: seen.append(sigma) or np.zeros_like(v))
    monkeypatch.setitem(sys.modules, "bm4d", fake)
    monkeypatch.setattr(baseline_report, "bm4d_available", lambda: True)
    out = baseline_report.restore_all("mr_rician4", noisy, affine, [1, 1, 1])
    rows = [m for m in out if m.startswith("bm4d")]
    assert len(rows) == len(baseline_report.BM4D_SIGMA_FACTORS) == len(seen)
    estimate = baselines.noise_sigma(noisy.double().numpy())
    assert 0.07 < estimate < 0.13
    for f, sigma in zip(baseline_report.BM4D_SIGMA_FACTORS, seen):
        assert sigma == pytest.approx(f * estimate)
    means = {m: {"psnr": float(i)} for i, m in enumerate(["nlm h=0.8", *rows])}
    assert [m for m in baseline_report.tuned_best(means) if m.startswith("bm4d")] == [rows[-1]]
