"""Classical baselines a user would reach for instead of a network: interpolation and denoising filters.

BM4D comes from the optional ``bm4d`` package (``make install-bm4d``, requirements-baselines.txt): free for
non-commercial use only, so the bundle never depends on it; without it the BM4D rows are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.utils import optional_import
from scipy.ndimage import spline_filter1d
from scripts.degradations import blur
from scripts.grid import apply_along_axis, axis_positions, fov_grid, interpolation_matrix
from scripts.volumes import spacing_of
from skimage.restoration import denoise_nl_means, estimate_sigma

INTERPOLATIONS = {"trilinear": "linear", "bspline": "bspline"}


def resample(
    x: torch.Tensor, affine: np.ndarray, target_spacing: Sequence[float], method: str = "trilinear"
) -> tuple[torch.Tensor, np.ndarray]:
    """Resample ``x`` (last three dims spatial) onto the FOV-preserving grid at ``target_spacing``.

    ``trilinear`` or cubic ``bspline`` (with the usual spline prefilter, mirror boundary). Axes whose spacing
    does not change are left untouched. Returns the volume and its affine.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {method!r}; use one of {sorted(INTERPOLATIONS)}")
    target_spacing = [float(t) for t in target_spacing]
    if len(target_spacing) != 3 or min(target_spacing) <= 0:
        raise ValueError(f"target_spacing must be three positive numbers in mm, got {target_spacing}")
    shape, new_affine, axes = fov_grid(x.shape[-3:], affine, target_spacing)
    out = x
    for axis, (n_out, scale, offset) in enumerate(axes):
        dim = x.ndim - 3 + axis
        n = x.shape[dim]
        if n_out == n and abs(scale - 1) < 1e-9:
            continue
        if method == "bspline" and n > 1:
            coeffs = spline_filter1d(out.detach().cpu().double().numpy(), order=3, axis=dim, mode="mirror")
            out = torch.as_tensor(coeffs, dtype=x.dtype, device=x.device)
        matrix = interpolation_matrix(n, axis_positions(n_out, scale, offset), INTERPOLATIONS[method])
        out = apply_along_axis(out, matrix, dim)
    return out, new_affine


def gaussian_denoise(x: torch.Tensor, affine: np.ndarray, sigma_mm: float) -> torch.Tensor:
    """Isotropic Gaussian smoothing with ``sigma_mm`` (the blur operator used as a denoiser)."""
    return blur(x, sigma_mm, spacing_of(affine), "gaussian")


def nlm_denoise(
    x: torch.Tensor, h_factor: float = 0.8, patch_size: int = 5, patch_distance: int = 6, sigma: float | None = None
) -> torch.Tensor:
    """Non-local means (scikit-image), slice by slice along the last axis, ``h = h_factor * sigma``.

    ``sigma`` is estimated from the data (wavelet MAD, ``estimate_sigma``) when not given.
    """
    vol = x.detach().cpu().double().numpy()
    flat = vol.reshape(-1, *vol.shape[-3:])
    out = np.empty_like(flat)
    for c, v in enumerate(flat):
        s = float(sigma) if sigma is not None else noise_sigma(v)
        for k in range(v.shape[-1]):
            out[c, ..., k] = denoise_nl_means(
                v[..., k], h=h_factor * s, sigma=s, patch_size=patch_size, patch_distance=patch_distance, fast_mode=True
            )
    return torch.as_tensor(out.reshape(vol.shape), dtype=x.dtype, device=x.device)


def noise_sigma(v: np.ndarray) -> float:
    """The noise standard deviation of a 3D volume: the median of the wavelet-MAD estimates
    (``estimate_sigma``) of eight of its slices along the last axis."""
    return float(np.median([estimate_sigma(v[..., k]) for k in range(0, v.shape[-1], max(1, v.shape[-1] // 8))]))


def bm4d_available() -> bool:
    """Whether the optional ``bm4d`` package is installed."""
    return bool(optional_import("bm4d")[1])


def bm4d_denoise(x: torch.Tensor, sigma_factor: float = 1.0, sigma: float | None = None) -> torch.Tensor:
    """BM4D (both stages, its default profile) on the whole volume with a white-noise model of standard deviation
    ``sigma_factor * sigma``; ``sigma`` is estimated from the data as for NLM (``noise_sigma``) when not given."""
    bm4d, _ = optional_import("bm4d")  # MONAI's optional import: the module imports without the package
    vol = x.detach().cpu().double().numpy()
    flat = vol.reshape(-1, *vol.shape[-3:])
    out = np.stack([bm4d.bm4d(v, sigma_factor * (sigma if sigma is not None else noise_sigma(v))) for v in flat])
    return torch.as_tensor(out.reshape(vol.shape), dtype=x.dtype, device=x.device)
