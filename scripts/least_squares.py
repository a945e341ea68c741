"""Known-operator least squares: CGLS toward an observed volume, stopped at its noise level (the discrepancy
principle), and the known-kernel deblurring built on it.

``least_squares_consistency`` is posterior sampling's image-space finish and the results table's classical
"known operator" rows. ``deblur`` is the first step of the main job's ``--degradation blur``: least squares
with the blur the user names, whose output the deblurring network (``restoration_ct_blur.pt``) then refines;
``RandBlurLeastSquaresd`` makes its training pairs the same way, on each training crop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from scripts.degradations import RandBlurd, blur
from skimage.restoration import estimate_sigma

BLUR_KERNELS = ("gaussian", "box")


def estimate_noise(observed: torch.Tensor) -> float:
    """Noise standard deviation of a normalised volume, by the wavelet MAD estimator (Donoho & Johnstone)."""
    return float(estimate_sigma(observed.detach().cpu().numpy().squeeze(), channel_axis=None))


def least_squares_consistency(
    x: torch.Tensor,
    observed: torch.Tensor,
    operator: Callable[[torch.Tensor], torch.Tensor],
    noise_sigma: float,
    max_iters: int = 20,
) -> torch.Tensor:
    """Move ``x`` toward ``observed = A x`` in image space: CGLS iterations on ``||y - A x||`` from ``x``, stopped
    by the discrepancy principle so that noise is not fitted: a step that would take the misfit under
    ``noise_sigma sqrt(m)`` is shortened to end on it (for the identity, denoising, the one step toward ``y``
    becomes the blend of ``x`` and ``y`` whose misfit is the noise level).

    The changes lie in the range of ``A^T``, so what ``y`` cannot tell (the null space of ``A``) stays the
    prior's; without noise and for the box thick-slice operator this is the projection of
    ``scripts.enhance.data_consistency``. ``A`` must be linear; ``A^T`` is its vector-Jacobian product. Any
    units, as long as ``x``, ``observed`` and ``noise_sigma`` share them.
    """
    probe = torch.zeros_like(x, requires_grad=True)
    with torch.enable_grad():
        applied = operator(probe)

    def adjoint(r: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(applied, probe, r, retain_graph=True)[0]

    x = x.detach().clone()
    with torch.no_grad():
        r = observed - operator(x)
        tolerance = float(noise_sigma) * r.numel() ** 0.5
        s = adjoint(r)
        p, gamma = s, s.pow(2).sum()
        for _ in range(int(max_iters)):
            if torch.linalg.vector_norm(r) <= tolerance or gamma == 0:
                break
            q = operator(p)
            qq = q.pow(2).sum().clamp_min(1e-30)
            alpha = gamma / qq
            if torch.linalg.vector_norm(r - alpha * q) < tolerance:
                # the full step would fit noise (one step reaches y for the identity): stop on the noise level
                rq, rr = (r * q).sum(), r.pow(2).sum()
                alpha = (rq - (rq**2 - qq * (rr - tolerance**2)).clamp_min(0).sqrt()) / qq
                x = x + alpha * p
                break
            x, r = x + alpha * p, r - alpha * q
            s = adjoint(r)
            gamma, previous = s.pow(2).sum(), gamma
            p = s + gamma / previous * p
    return x


def deblur(
    x: torch.Tensor, spacing: Sequence[float], size_mm: float, kernel: str = "gaussian", max_iters: int = 20
) -> torch.Tensor:
    """Known-kernel deblurring of ``x`` (``(..., X, Y, Z)``, any units) blurred by ``scripts.degradations.blur``
    with ``kernel`` of ``size_mm`` (Gaussian sigma or box width) on a grid of ``spacing`` mm: least squares from
    ``x`` itself, stopped at the noise level estimated from ``x``."""
    if kernel not in BLUR_KERNELS:
        raise ValueError(f"blur kernel must be one of {', '.join(BLUR_KERNELS)}, got {kernel!r}")
    if not float(size_mm) > 0:
        raise ValueError(f"blur size must be > 0 mm, got {size_mm}")
    spacing = [float(s) for s in spacing]
    x = x.float()
    return least_squares_consistency(
        x, x, lambda v: blur(v, float(size_mm), spacing, kernel), estimate_noise(x), int(max_iters)
    )


class RandBlurLeastSquaresd(RandBlurd):
    """``RandBlurd`` followed by the drawn kernel's least squares (``deblur``): the deblurring network's input, made
    as the main job makes it, so that the network learns what least squares leaves (ringing, the detail the kernel
    removed). ``configs/train_restoration_ct_blur.json`` applies it to each crop's ``condition`` (still a copy of
    the image there): least squares over a whole training slab would dominate the step. The crop's own edges are
    replicated."""

    def __init__(
        self,
        keys: KeysCollection = "condition",
        size_mm_range: Sequence[float] = (0.5, 2.0),
        kernels: Sequence[str] = BLUR_KERNELS,
        max_iters: int = 20,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, size_mm_range, kernels, prob, allow_missing_keys)
        self.max_iters = int(max_iters)

    def apply(self, img: torch.Tensor, spacing: np.ndarray, params: dict) -> torch.Tensor:
        with torch.no_grad():
            blurred = super().apply(img.float(), spacing, params)
            return deblur(blurred, spacing, params["size_mm"], params["kernel"], self.max_iters)
