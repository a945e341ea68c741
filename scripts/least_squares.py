"""Known-operator least squares: CGLS toward an observed volume, stopped at its noise level (the discrepancy
principle), and the known-kernel deblurring built on it.

``least_squares_consistency`` is posterior sampling's image-space finish and the results table's classical
"known operator" rows. ``deblur`` is the first step of the main job's ``--degradation blur``: least squares
with the blur the user names, whose output the deblurring network (``restoration_ct_blur.pt``) then refines;
``RandBlurLeastSquaresd`` makes its training pairs the same way, on each training crop.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from scripts.degradations import blur
from scripts.volumes import spacing_of
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


class RandBlurLeastSquaresd(RandomizableTransform, MapTransform):
    """Deblurring training pairs on a crop: ``condition`` becomes ``deblur(blur(image))`` with a kernel drawn as
    ``scripts.degradations.RandBlurd`` draws it, so that the network learns what least squares leaves (ringing,
    the detail the kernel removed) from the same first step the main job runs. Runs after cropping (least
    squares over a whole training slab would dominate the step); the crop's own edges are replicated."""

    def __init__(
        self,
        image_key: str = "image",
        condition_key: str = "condition",
        size_mm_range: Sequence[float] = (0.5, 2.0),
        kernels: Sequence[str] = BLUR_KERNELS,
        max_iters: int = 20,
    ) -> None:
        MapTransform.__init__(self, [condition_key])
        RandomizableTransform.__init__(self, 1.0)
        self.image_key, self.condition_key = image_key, condition_key
        self.size_mm_range, self.kernels, self.max_iters = size_mm_range, list(kernels), int(max_iters)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        lo, hi = float(self.size_mm_range[0]), float(self.size_mm_range[-1])
        size_mm = lo if hi <= lo else float(self.R.uniform(lo, hi))
        kernel = str(self.R.choice(self.kernels))
        spacing = spacing_of(image.affine) if isinstance(image, MetaTensor) else np.ones(3)
        plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        with torch.no_grad():
            out = deblur(blur(plain.float(), size_mm, spacing, kernel), spacing, size_mm, kernel, self.max_iters)
        condition = d[self.condition_key]
        d[self.condition_key] = MetaTensor(out, meta=dict(condition.meta)) if isinstance(condition, MetaTensor) else out
        return d
