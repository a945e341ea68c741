"""Zero-shot restoration by latent diffusion posterior sampling: a known linear degradation ``y = A x + n`` and
the unconditional prior alone (no paired training).

Every reverse DDIM step predicts the clean latent ``z0`` from ``z_t``, decodes it, re-degrades it with the
foundation's operators (``scripts.degradations``, differentiable in torch) and moves ``z_t`` down the gradient of
the misfit ``||y - A D(z0)||``:

- ``dps`` (Chung et al. 2022): the gradient with respect to ``z_t``, through the prior and the decoder; the most
  faithful, and the most expensive (back-propagation through the prior).
- ``dmps`` (after Meng & Kabashima 2022, who drop the denoiser's Jacobian): the gradient with respect to ``z0``,
  through the decoder only; slightly cheaper (the decoder dominates: ``python -m scripts.bench posterior``).

The step is normalised to ``step_size`` latent units (RMS) times ``(1 - sigma_y sqrt(m) / ||r||)`` clipped to
[0, 1] (the discrepancy principle: guidance fades as the misfit reaches the noise level, so noise is not fitted),
and grows linearly to ``step_size`` over the steps with ``schedule='linear'``. ``refine_iters`` ends with
ReSample-style (Song et al. 2023) optimisation of the final latent against ``y``, and ``consistency_iters`` with
CGLS iterations in image space (``least_squares_consistency``): the decoder cannot return the detail its
autoencoder loses, this step restores what ``y`` holds of it and leaves the rest (the null space of ``A``) to the
prior. Memory is bounded: the prior and the decoder run window by window (``tiled_apply``) and every window is
wrapped in activation checkpointing, so back-propagation holds one window's activations at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scripts.autoencoder import downsample_factors, encode_volume, latent_roi, pad_for, tiled_apply
from scripts.baselines import resample
from scripts.degradations import blur, kspace_truncate
from scripts.diffusion import unet_divisor
from scripts.enhance import physical_range, resolve_modality, start_steps, target_spacing_of
from scripts.grid import apply_along_axis, fov_grid, profile_matrix
from scripts.intensity import denormalize, intensity_params, normalize
from scripts.least_squares import estimate_noise, least_squares_consistency
from scripts.volumes import load_volume, save_volume, spacing_of
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

logger = logging.getLogger(__name__)
OPERATORS = ("thick_slice", "blur", "kspace", "identity")


def output_spacing(image: torch.Tensor, operator: str, factor: float, target_spacing=None) -> list[float]:
    """The grid x lives on: ``target_spacing`` if given, else the input's, with z divided by ``factor`` for
    ``thick_slice``."""
    if target_spacing is not None and not (isinstance(target_spacing, str) and not target_spacing.strip()):
        return target_spacing_of(image, target_spacing)
    spacing = spacing_of(image.affine).tolist()
    if operator == "thick_slice":
        spacing[2] /= float(factor)
    return spacing


def forward_operator(
    operator: str,
    in_shape: Sequence[int],
    in_affine: np.ndarray,
    out_shape: Sequence[int],
    out_affine: np.ndarray,
    profile: str = "box",
    kernel: str = "gaussian",
    sigma_mm: float = 1.0,
    factor: float = 2.0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``A``: a volume on the output grid ``(..., X, Y, Z)`` -> the observed volume on the input grid.

    ``thick_slice``: each input slice is the ``profile`` average of the output slices under it (width: the input
    slice spacing, centred where the input slice lies in the world), as in ``scripts.degradations.thick_slice``;
    ``blur``: a Gaussian or box blur of ``sigma_mm`` (``scripts.degradations.blur``); ``kspace``: the central
    ``1/factor`` of k-space in-plane; ``identity``: denoising. Only ``thick_slice`` changes the grid, along z.
    """
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")
    if operator != "thick_slice" and tuple(in_shape) != tuple(out_shape):
        raise ValueError(f"operator {operator!r} keeps the grid; give no target_spacing (or the input's)")
    if operator == "thick_slice":
        to_out = np.linalg.inv(out_affine) @ in_affine
        if tuple(in_shape[:2]) != tuple(out_shape[:2]) or not np.allclose(to_out[:2, :3], np.eye(3)[:2], atol=1e-4):
            raise ValueError("thick_slice changes z only: keep the input's in-plane spacing")
        positions = to_out[2, 2] * np.arange(in_shape[2]) + to_out[2, 3]
        matrix = profile_matrix(int(out_shape[2]), positions, float(to_out[2, 2]), profile)
        return lambda x: apply_along_axis(x, matrix, x.ndim - 1)
    if operator == "blur":
        spacing = spacing_of(out_affine).tolist()
        return lambda x: blur(x, sigma_mm, spacing, kernel)
    if operator == "kspace":
        return lambda x: kspace_truncate(x, factor)
    return lambda x: x


def _checkpointed(fn: Callable) -> Callable:
    return lambda t: checkpoint(fn, t, use_reentrant=False) if torch.is_grad_enabled() else fn(t)


def posterior_sample(
    autoencoder: torch.nn.Module,
    diffusion: torch.nn.Module,
    scheduler,
    scale_factor: float,
    observed: torch.Tensor,
    operator: Callable[[torch.Tensor], torch.Tensor],
    out_shape: Sequence[int],
    noise_sigma: float,
    num_inference_steps: int = 50,
    generator: torch.Generator | None = None,
    method: str = "dps",
    step_size: float = 1.0,
    schedule: str = "linear",
    refine_iters: int = 0,
    refine_lr: float = 0.2,
    roi_size: Sequence[int] = (32, 32, 8),
    overlap: float = 0.5,
    halo: int = 4,
    record: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = True,
    start: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """A normalised volume ``(1, 1, *out_shape)`` whose re-degradation matches the normalised ``observed``.

    ``strength < 1`` starts from ``start`` (a normalised first estimate on the output grid, e.g. the input
    interpolated onto it) encoded and noised to the first of the last ``strength`` fraction of the steps, and runs
    only those (as ``--strength`` in the main job; Chung et al. 2022, "Come-Closer-Diffuse-Faster"): fewer
    steps, and the estimate's large-scale content instead of what an imperfect prior draws from pure noise."""
    if method not in ("dps", "dmps"):
        raise ValueError(f"method must be 'dps' or 'dmps', got {method!r}")
    if schedule not in ("constant", "linear"):
        raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
    device = observed.device
    fs, unit = downsample_factors(autoencoder), unet_divisor(diffusion)
    padded, crop = pad_for(autoencoder, torch.zeros(1, 1, *out_shape, device=device), unit)
    latent_shape = [s // f for s, f in zip(padded.shape[2:], fs)]
    z = torch.randn((1, diffusion.in_channels, *latent_shape), generator=generator).to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    z_start = None
    if 0 < strength < 1:  # start_steps refuses any other strength
        if start is None:
            raise ValueError("strength < 1 needs a start estimate")
        with torch.no_grad():
            z_start = (
                encode_volume(
                    autoencoder,
                    pad_for(autoencoder, start.to(device), unit)[0],
                    [r * f for r, f in zip(roi_size, fs)],
                    overlap,
                )
                * scale_factor
            )
    timesteps, z = start_steps(scheduler, z, z_start, strength)
    n = len(timesteps)
    # frozen networks: gradients are wanted for the latent only
    for p in [*autoencoder.parameters(), *diffusion.parameters()]:
        p.requires_grad_(False)

    def decode(z0: torch.Tensor) -> torch.Tensor:
        x = tiled_apply(
            _checkpointed(autoencoder.decode),
            z0 / scale_factor,
            roi_size,
            fs,
            overlap,
            [halo if f > 1 else 0 for f in fs],
        )
        return x[crop]

    def misfit(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(observed - operator(x))

    for i, t in enumerate(tqdm(timesteps, desc="posterior sampling", disable=not progress)):
        ab = scheduler.alphas_cumprod[int(t)].to(device)
        zeta = step_size * ((i + 1) / n if schedule == "linear" else 1.0)
        ts = t.reshape(1).to(device)
        z = z.detach().requires_grad_(method == "dps")
        with torch.set_grad_enabled(method == "dps"):
            eps = tiled_apply(
                _checkpointed(lambda w: diffusion(x=w, timesteps=ts)), z, roi_size, 1.0, overlap, halo, unit
            )
            z0 = (z - (1 - ab).sqrt() * eps) / ab.sqrt()
        if method == "dmps":
            z0 = z0.detach().requires_grad_(True)
        with torch.enable_grad():
            x0 = decode(z0)
            r = misfit(x0)
            (grad,) = torch.autograd.grad(r, z if method == "dps" else z0)
        # a step of zeta latent units (RMS), shrinking to 0 as the misfit reaches the noise level
        discrepancy = float((1 - noise_sigma * observed.numel() ** 0.5 / r.detach()).clamp(0, 1))
        grad = grad / grad.pow(2).mean().sqrt().clamp_min(1e-12) * discrepancy
        if record is not None:
            record(i, x0.detach())
        z = scheduler.step(eps.detach(), int(t), z.detach())[0] - zeta * grad
    z0 = z.detach()
    if refine_iters > 0:  # ReSample-style hard data consistency on the final latent
        z0 = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z0], lr=refine_lr)
        for _ in range(int(refine_iters)):
            opt.zero_grad()
            with torch.enable_grad():
                misfit(decode(z0)).backward()
            opt.step()
        z0 = z0.detach()
    with torch.no_grad():
        return decode(z0)


class Recorder:
    """``--record DIR``: the middle slice of the current clean estimate at every reverse step, as PNGs and a GIF."""

    def __init__(self, folder: str | Path) -> None:
        self.folder, self.frames = Path(folder), []
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, x0: torch.Tensor) -> None:
        import matplotlib.pyplot as plt

        sl = x0[0, 0, :, :, x0.shape[-1] // 2].float().cpu().numpy().T[::-1, ::-1]  # LPS display, as figures.py
        path = self.folder / f"step_{step:03d}.png"
        plt.imsave(path, np.clip(sl, 0, 1), cmap="gray", vmin=0, vmax=1)
        self.frames.append(path)

    def close(self) -> Path:
        from PIL import Image

        images = [Image.open(p) for p in self.frames]
        gif = self.folder / "reverse_steps.gif"
        images[0].save(gif, save_all=True, append_images=images[1:], duration=120, loop=0)
        return gif


def restore(
    input_image: str,
    output_image: str,
    networks: dict,
    operator: str = "thick_slice",
    factor: float = 2.0,
    profile: str = "box",
    kernel: str = "gaussian",
    sigma_mm: float = 1.0,
    noise_sigma: float | None = None,
    target_spacing: Sequence[float] | str | None = None,
    modality: str | None = None,
    num_inference_steps: int = 50,
    seed: int = 0,
    method: str = "dps",
    step_size: float = 1.0,
    schedule: str = "linear",
    refine_iters: int = 0,
    consistency_iters: int = 20,
    strength: float = 1.0,
    sliding_window: dict | None = None,
    device: str | torch.device = "cpu",
    record: str = "",
    series_uid: str | None = None,
) -> dict:
    """The posterior-sampling main job: ``input_image`` (degraded by the known operator) -> ``output_image``
    (NIfTI, atomic, the input's units and world position). ``noise_sigma`` is in the input's units; without it
    the noise is estimated from the input. ``consistency_iters`` > 0 ends with that many CGLS iterations toward
    the input in image space (``least_squares_consistency``), which the decoder alone cannot reach.
    ``strength < 1`` starts from the input interpolated onto the output grid (see ``posterior_sample``)."""
    if not str(output_image).endswith((".nii", ".nii.gz")):
        raise ValueError(f"{output_image}: the output must be a NIfTI file (.nii.gz or .nii)")
    t0 = time.perf_counter()
    device = torch.device(device)
    image = load_volume(input_image, series_uid=series_uid)
    modality = resolve_modality(image, modality)
    in_affine = np.asarray(image.affine)
    spacing = output_spacing(image, operator, factor, target_spacing)
    out_shape, out_affine, _ = fov_grid(image.shape[1:], in_affine, spacing)
    op = forward_operator(
        operator, image.shape[1:], in_affine, out_shape, out_affine, profile, kernel, sigma_mm, factor
    )
    params = intensity_params(image.as_tensor(), modality)
    observed = normalize(image.as_tensor().float(), params)[None].to(device)
    unit = 1.0 / float(params["scale"])  # one unit of the input in normalised values
    sigma = estimate_noise(observed) if noise_sigma is None else float(noise_sigma) * unit
    sw = {"roi_size": [256, 256, 32], "sampling_overlap": 0.5, **(sliding_window or {})}
    recorder = Recorder(record) if record else None
    start = None
    if strength < 1:  # the input interpolated onto the output grid (itself on the same grid), as the main job's
        start = normalize(resample(image.as_tensor().float(), in_affine, spacing, "trilinear")[0], params)[None]
    x = posterior_sample(
        networks["autoencoder"].eval(),
        networks["diffusion"].eval(),
        networks["scheduler"],
        float(networks["scale_factor"]),
        observed,
        op,
        out_shape,
        sigma,
        num_inference_steps,
        torch.Generator().manual_seed(int(seed)),
        method,
        step_size,
        schedule,
        refine_iters,
        roi_size=latent_roi(networks["autoencoder"], sw["roi_size"]),
        overlap=sw["sampling_overlap"],
        record=recorder,
        start=start,
        strength=float(strength),
    )
    if int(consistency_iters) > 0:
        x = least_squares_consistency(x, observed, op, sigma, int(consistency_iters))
    out = physical_range(denormalize(x[0].float().cpu(), params), image, modality)
    save_volume(out, out_affine, output_image, dtype="int16" if modality == "ct" else "float32")
    result = {
        "output": str(output_image),
        "seconds": time.perf_counter() - t0,
        "noise_sigma": sigma / unit,
        "misfit": float(torch.linalg.vector_norm(observed.cpu() - op(x.cpu())) / observed.numel() ** 0.5),
    }
    if recorder is not None:
        result["record"] = str(recorder.close())
    logger.info(
        "posterior sampling (%s, %s) %s -> %s in %.1f s, noise sigma %.3g",
        method,
        operator,
        input_image,
        output_image,
        result["seconds"],
        result["noise_sigma"],
    )
    return result
