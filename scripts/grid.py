"""Field-of-view-preserving grids and separable per-axis resampling matrices.

Convention used everywhere in the bundle (thick slices, super-resolution, baselines): a grid keeps the
*edges* of the field of view. Going from spacing ``s`` to spacing ``t`` along an axis of ``n`` voxels gives
``round(n * s / t)`` voxels whose ``j``-th centre lies at source index ``(j + 0.5) * t / s - 0.5``.
With an integer factor ``f = t / s``, output voxel ``k`` therefore covers source voxels ``k*f ... k*f+f-1``
and each coarse voxel maps onto exactly ``f`` fine ones. MONAI's ``Spacing`` aligns voxel centres instead
of edges, which shifts the grid by half a voxel; that is why these helpers exist.

Every resampling is a small dense matrix applied along one axis: linear, differentiable, with an exact
adjoint (its transpose), which the data-consistency and posterior-sampling code rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import floor, sqrt

import numpy as np
import torch
from scipy.special import ndtr

FWHM_TO_SIGMA = 1.0 / (2.0 * sqrt(2.0 * np.log(2.0)))


def axis_positions(n_out: int, scale: float, offset: float) -> np.ndarray:
    """Source-index coordinates of the ``n_out`` output voxel centres: ``j * scale + offset``."""
    return np.arange(n_out, dtype=np.float64) * scale + offset


def fov_axis(n: int, spacing: float, target: float) -> tuple[int, float, float]:
    """Output length, scale and offset (in source-index units) of the FOV-preserving grid along one axis."""
    if target <= 0:
        raise ValueError(f"target spacing must be positive, got {target}")
    n_out = max(1, int(round(n * spacing / target)))
    scale = target / spacing
    return n_out, scale, 0.5 * scale - 0.5


def grid_affine(affine: np.ndarray, scales: Sequence[float], offsets: Sequence[float]) -> np.ndarray:
    """Affine of a grid whose voxel ``j`` sits at source index ``j * scale + offset`` along each axis."""
    t = np.eye(4)
    t[:3, :3] = np.diag(scales)
    t[:3, 3] = offsets
    return np.asarray(affine, dtype=np.float64) @ t


def fov_grid(
    shape: Sequence[int], affine: np.ndarray, target_spacing: Sequence[float]
) -> tuple[tuple[int, ...], np.ndarray, list[tuple[int, float, float]]]:
    """Shape, affine and per-axis ``(n_out, scale, offset)`` of the FOV-preserving grid at ``target_spacing``."""
    from scripts.volumes import spacing_of

    spacing = spacing_of(affine)
    axes = [fov_axis(int(n), float(s), float(t)) for n, s, t in zip(shape, spacing, target_spacing)]
    new_affine = grid_affine(affine, [a[1] for a in axes], [a[2] for a in axes])
    return tuple(a[0] for a in axes), new_affine, axes


def _mirror(i: np.ndarray, n: int) -> np.ndarray:
    """Whole-sample mirror boundary (scipy's ``mode='mirror'``): d c b | a b c d | c b a."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i > n - 1, period - i, i)


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def interpolation_matrix(n_in: int, positions: np.ndarray, kind: str = "linear") -> np.ndarray:
    """``(len(positions), n_in)`` matrix sampling a signal at fractional source positions.

    ``linear`` clamps at the edges. ``bspline`` evaluates a cubic B-spline and expects coefficients
    (``scipy.ndimage.spline_filter1d(..., mode='mirror')``), as in ``scipy.ndimage.map_coordinates``.
    """
    m = np.zeros((len(positions), n_in))
    rows = np.arange(len(positions))
    if kind == "linear":
        p = np.clip(positions, 0, n_in - 1)
        i0 = np.floor(p).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = p - i0
        np.add.at(m, (rows, i0), 1 - w)
        np.add.at(m, (rows, i1), w)
    elif kind == "bspline":
        base = np.floor(positions).astype(int)
        for k in range(-1, 3):
            idx = base + k
            np.add.at(m, (rows, _mirror(idx, n_in)), _cubic_bspline(positions - idx))
    else:
        raise ValueError(f"unknown interpolation kind {kind!r}; use 'linear' or 'bspline'")
    return m


def profile_matrix(n_in: int, positions: np.ndarray, width: float, profile: str = "box") -> np.ndarray:
    """``(len(positions), n_in)`` matrix averaging source voxels under a slice profile of ``width`` voxels.

    ``box``: the exact overlap of ``[u - width/2, u + width/2]`` with each voxel ``[i - 0.5, i + 0.5]``.
    ``gaussian``: a Gaussian with FWHM ``width``, integrated over each voxel. Rows are normalised so that
    a constant volume stays constant, also where the profile reaches past the volume's edge.
    """
    edges = np.arange(n_in + 1, dtype=np.float64) - 0.5
    if profile == "box":
        lo = positions[:, None] - width / 2
        hi = positions[:, None] + width / 2
        m = np.clip(np.minimum(hi, edges[None, 1:]) - np.maximum(lo, edges[None, :-1]), 0, None)
    elif profile == "gaussian":
        sigma = max(width * FWHM_TO_SIGMA, 1e-6)
        cdf = ndtr((edges[None, :] - positions[:, None]) / sigma)
        m = cdf[:, 1:] - cdf[:, :-1]
    else:
        raise ValueError(f"unknown slice profile {profile!r}; use 'box' or 'gaussian'")
    return m / m.sum(axis=1, keepdims=True)


def apply_along_axis(x: torch.Tensor, matrix: np.ndarray | torch.Tensor, axis: int) -> torch.Tensor:
    """Apply ``matrix`` (``n_out x n_in``) along ``axis`` of ``x``; differentiable in ``x``."""
    m = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
    return torch.movedim(torch.tensordot(m, torch.movedim(x, axis, 0), dims=1), 0, axis)


def thick_axis(n: int, factor: float) -> tuple[int, float, float]:
    """``(n_out, scale, offset)`` of contiguous thick slices ``factor`` thin slices apart, edges aligned at 0.

    Only thick slices that lie wholly inside the volume are kept: ``floor(n / factor)`` of them.
    """
    if factor < 1:
        raise ValueError(f"thick-slice factor must be >= 1, got {factor}")
    n_out = max(1, floor(n / factor + 1e-6))
    return n_out, float(factor), 0.5 * factor - 0.5
