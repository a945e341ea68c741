"""Image-quality metrics as plain functions and as a MONAI cumulative metric for Ignite evaluators.

Scoring conventions (documented in docs/README.md):
- CT: PSNR and SSIM on HU clipped to ``CT_WINDOW`` (-1000..1000 HU, data range 2000); MAE on raw HU over the
  whole volume; HU-MAE on raw HU inside the body mask of the reference.
- Sharpness: the ratio of the output's 3D-Laplacian energy to the reference's inside the same mask (voxel
  units, CT on the clipped window); 1.0 is as sharp as the truth.
- MR: both volumes divided by the reference's 99.5th percentile (``mr_scale``); PSNR, SSIM (data range 1) and MAE
  in those units, inside the head mask (reference above ``MR_MASK_FRACTION`` of that percentile, holes filled,
  largest component), so that the empty background does not dominate.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from scipy import ndimage

CT_WINDOW = (-1000.0, 1000.0)
BODY_THRESHOLD_HU = -500.0
MR_PERCENTILE = 99.5
MR_MASK_FRACTION = 0.1


def _t(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).double()


def _masked(values: torch.Tensor, mask: np.ndarray | None) -> torch.Tensor:
    if mask is None:
        return values
    m = torch.as_tensor(np.asarray(mask, dtype=bool))
    if not bool(m.any()):
        raise ValueError("the mask is empty")
    return values[m.expand_as(values)]


def psnr(
    pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, data_range: float, mask: np.ndarray | None = None
) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)`` (over ``mask``); ``inf`` if identical."""
    mse = float(torch.mean(_masked((_t(pred) - _t(ref)) ** 2, mask)))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def _gaussian_window(x: torch.Tensor, size: int, sigma: float = 1.5) -> torch.Tensor:
    """Separable, normalised Gaussian local mean over the last three dims (valid region only)."""
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    for dim in (-3, -2, -1):
        x = x.unfold(dim, size, 1) @ g
    return x


def ssim(
    pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, data_range: float, mask: np.ndarray | None = None
) -> float:
    """Mean 3D SSIM (Wang et al. 2004): Gaussian window sigma 1.5, size 11 (or the largest odd size that fits),
    K1 = 0.01, K2 = 0.03, valid region only; with ``mask``, the mean over the masked window centres.

    Computed in float64: MONAI's ``SSIMMetric`` works in float32, whose cancellation in ``E[x^2] - E[x]^2`` puts
    errors of about 0.3 % on flat regions.
    """
    p, r = _t(pred).reshape(_t(pred).shape[-3:]), _t(ref).reshape(_t(ref).shape[-3:])
    size = min(11, *[s if s % 2 else s - 1 for s in r.shape])
    if size < 3:
        raise ValueError(f"volume of shape {tuple(r.shape)} is too small for 3D SSIM")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_p, mu_r = _gaussian_window(p, size), _gaussian_window(r, size)
    var_p = _gaussian_window(p * p, size) - mu_p**2
    var_r = _gaussian_window(r * r, size) - mu_r**2
    cov = _gaussian_window(p * r, size) - mu_p * mu_r
    value = ((2 * mu_p * mu_r + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_r**2 + c1) * (var_p + var_r + c2))
    if mask is not None:
        h = size // 2
        mask = np.asarray(mask, dtype=bool).reshape(r.shape)[h : r.shape[0] - h, h : r.shape[1] - h, h : r.shape[2] - h]
    return float(_masked(value, mask).mean())


def mae(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, mask: np.ndarray | None = None) -> float:
    """Mean absolute error, over ``mask`` when given."""
    return float(_masked(torch.abs(_t(pred) - _t(ref)), mask).mean())


def body_mask(ref_hu: np.ndarray | torch.Tensor, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Body (CT) or head (MR) mask: voxels above ``threshold``, holes filled per axial slice, largest component."""
    ref = _t(ref_hu)
    v = np.asarray(ref.reshape(ref.shape[-3:])) > threshold
    for k in range(v.shape[-1]):
        v[..., k] = ndimage.binary_fill_holes(v[..., k])
    labels, n = ndimage.label(v)
    if n > 1:
        sizes = ndimage.sum(v, labels, index=range(1, n + 1))
        v = labels == (1 + int(np.argmax(sizes)))
    return v


def mr_scale(ref: np.ndarray | torch.Tensor) -> float:
    """Normalisation constant for MR scoring: the reference's 99.5th percentile."""
    s = float(np.percentile(np.asarray(_t(ref)), MR_PERCENTILE))
    if s <= 0:
        raise ValueError("reference MR volume has no positive signal")
    return s


def laplacian_energy(x: torch.Tensor, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Squared 3D Laplacian (second differences along each axis divided by the spacing squared), on the interior
    voxels of a volume ``(..., X, Y, Z)``: its high-frequency energy per voxel."""
    v = _t(x).reshape(_t(x).shape[-3:])
    lap = torch.zeros_like(v[1:-1, 1:-1, 1:-1])
    for axis, h in enumerate(spacing):
        lo, mid, hi = [v.narrow(axis, s, v.shape[axis] - 2) for s in (0, 1, 2)]
        d2 = (lo - 2 * mid + hi) / float(h) ** 2
        idx = [slice(1, -1)] * 3
        idx[axis] = slice(None)
        lap = lap + d2[tuple(idx)]
    return lap**2


def sharpness_ratio(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    mask: np.ndarray | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> float:
    """Root of the mean 3D-Laplacian energy of ``pred`` over that of ``ref``, over ``mask`` (interior voxels):
    1.0 is as sharp as the reference, below 1 smoother (regression's averaging), above 1 noisier or ringing."""
    m = None if mask is None else np.asarray(mask, dtype=bool).reshape(_t(ref).shape[-3:])[1:-1, 1:-1, 1:-1]
    energy_ref = float(_masked(laplacian_energy(ref, spacing), m).mean())
    if energy_ref == 0:
        return float("nan")
    return float(np.sqrt(float(_masked(laplacian_energy(pred, spacing), m).mean()) / energy_ref))


def score(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, modality: str = "ct") -> dict[str, float]:
    """All metrics for one volume pair, following the conventions in this module's docstring."""
    p, r = _t(pred), _t(ref)
    if p.shape[-3:] != r.shape[-3:]:
        raise ValueError(f"shape mismatch: prediction {tuple(p.shape)} vs reference {tuple(r.shape)}")
    if modality == "ct":
        lo, hi = CT_WINDOW
        pc, rc = p.clamp(lo, hi), r.clamp(lo, hi)
        return {
            "psnr": psnr(pc, rc, hi - lo),
            "ssim": ssim(pc, rc, hi - lo),
            "mae": mae(p, r),
            "hu_mae_body": mae(p, r, body_mask(r)),
            "sharpness": sharpness_ratio(pc, rc, body_mask(r)),
        }
    if modality == "mr":
        s = mr_scale(r)
        m = body_mask(r, MR_MASK_FRACTION * s)
        return {
            "psnr": psnr(p / s, r / s, 1.0, m),
            "ssim": ssim(p / s, r / s, 1.0, m),
            "mae": mae(p / s, r / s, m),
            "sharpness": sharpness_ratio(p / s, r / s, m),
        }
    raise ValueError(f"unknown modality {modality!r}; use 'ct' or 'mr'")


class ScoreMetric(CumulativeIterationMetric):
    """One of ``score``'s metrics (``psnr``, ``ssim``, ``mae``, ``hu_mae_body``) for MONAI/Ignite evaluators.

    Use with ``monai.handlers.IgniteMetricHandler(metric_fn=ScoreMetric("psnr", "ct"))`` on batches
    ``(B, 1, X, Y, Z)`` in original units (HU for CT), so that validation follows the scoring conventions.
    """

    def __init__(self, name: str = "psnr", modality: str = "ct") -> None:
        super().__init__()
        self.name, self.modality = name, modality

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pairs = zip(y_pred.detach().cpu(), y.detach().cpu())
        return torch.tensor([score(p, r, self.modality)[self.name] for p, r in pairs], dtype=torch.float64)[:, None]

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        return data.mean()
