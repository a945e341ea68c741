"""Parallel-beam forward projection and filtered back projection in torch, slice by slice.

Used to make low-dose CT noise in the projection domain. Lengths are in mm: a sinogram holds line integrals
of the attenuation coefficient (1/mm) along rays one pixel apart, so ``fbp(radon(mu, d), d) ~= mu``.
Both functions are linear in their input and run in chunks of views to bound memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def padded_size(height: int, width: int) -> int:
    """Side of the square that holds the slice under any rotation, so no ray misses the object."""
    return int(math.ceil(math.sqrt(height**2 + width**2))) + 2


def view_angles(n_views: int, device: torch.device | None = None) -> torch.Tensor:
    """``n_views`` equally spaced angles over 180 degrees (parallel-beam short scan)."""
    return torch.arange(n_views, dtype=torch.float64, device=device) * (math.pi / n_views)


def radon(images: torch.Tensor, pixel_mm: float, n_views: int = 360, chunk: int = 16) -> torch.Tensor:
    """Line integrals of ``images`` ``(B, H, W)`` over ``n_views`` views: a ``(B, n_views, n_det)`` sinogram.

    The slice is zero-padded to a square of side ``n_det`` (see ``padded_size``) and rotated by bilinear
    sampling; rays are summed with step ``pixel_mm``.
    """
    b, h, w = images.shape
    n = padded_size(h, w)
    py, px = (n - h) // 2, (n - w) // 2
    padded = F.pad(images, (px, n - w - px, py, n - h - py))[:, None]  # (B, 1, n, n): faster than channels
    coords = (torch.arange(n, dtype=torch.float64, device=images.device) - (n - 1) / 2) / ((n - 1) / 2)
    t, s = coords[:, None], coords[None, :]  # detector position, position along the ray
    views = []
    for theta in view_angles(n_views, images.device).split(chunk):
        c, si = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
        x = t * c - s * si
        y = t * si + s * c
        grid = torch.stack([x, y], dim=-1).reshape(1, -1, n, 2).to(images.dtype).expand(b, -1, -1, -1)
        sampled = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        views.append(sampled.reshape(b, len(theta), n, n).sum(-1))
    return torch.cat(views, dim=1) * pixel_mm


def ramp_filter(n_det: int, window: str = "ramp", device: torch.device | None = None) -> torch.Tensor:
    """Frequency response of the discrete ramp (Ram-Lak) filter, built in the spatial domain to avoid a DC bias.

    ``window='hann'`` multiplies it by a Hann window, a smoother kernel with less noise.
    """
    size = max(64, 2 ** int(math.ceil(math.log2(2 * n_det))))
    k = torch.cat([torch.arange(1, size // 2 + 1, 2), torch.arange(size // 2 - 1, 0, -2)]).double()
    spatial = torch.zeros(size, dtype=torch.float64)
    spatial[0] = 0.25
    spatial[1::2] = -1 / (math.pi * k) ** 2
    response = 2 * torch.fft.fft(spatial).real
    if window == "hann":
        freq = torch.fft.fftfreq(size, dtype=torch.float64)
        response = response * (0.5 + 0.5 * torch.cos(2 * math.pi * freq))
    elif window != "ramp":
        raise ValueError(f"unknown FBP window {window!r}; use 'ramp' or 'hann'")
    return response.to(device)


def fbp(
    sinogram: torch.Tensor, pixel_mm: float, height: int, width: int, window: str = "ramp", chunk: int = 16
) -> torch.Tensor:
    """Filtered back projection of a ``(B, n_views, n_det)`` sinogram from ``radon`` to ``(B, height, width)``."""
    b, n_views, n_det = sinogram.shape
    response = ramp_filter(n_det, window, sinogram.device)
    size = response.numel()
    spectrum = torch.fft.fft(F.pad(sinogram.double(), (0, size - n_det)), dim=-1)
    filtered = torch.fft.ifft(spectrum * response, dim=-1).real[..., :n_det].to(sinogram.dtype)
    ys = (torch.arange(height, dtype=torch.float64, device=sinogram.device) - (height - 1) / 2)[:, None]
    xs = (torch.arange(width, dtype=torch.float64, device=sinogram.device) - (width - 1) / 2)[None, :]
    angles = view_angles(n_views, sinogram.device)
    image = sinogram.new_zeros(b, height, width)
    source = filtered[:, None]  # (B, 1, n_views, n_det): views along "y", detector along "x"
    for idx in torch.arange(n_views, device=sinogram.device).split(chunk):
        theta = angles[idx][:, None, None]
        t = xs * torch.cos(theta) + ys * torch.sin(theta)  # detector coordinate in pixels
        gx = t / ((n_det - 1) / 2)
        gy = (idx.double()[:, None, None] * 2 / max(n_views - 1, 1) - 1).expand_as(gx)
        grid = torch.stack([gx, gy], dim=-1).reshape(1, -1, width, 2).to(sinogram.dtype).expand(b, -1, -1, -1)
        sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        image += sampled.reshape(b, len(idx), height, width).sum(1)
    return image * (math.pi / (2 * n_views)) / pixel_mm
