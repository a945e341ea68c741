"""The main job: enhance a whole CT or MR volume with the latent ControlNet, on the grid the user asks for.

Pipeline: load and check the input (file or DICOM folder) -> resample it onto the FOV-preserving target grid
(trilinear) -> normalise -> encode it window by window (the ControlNet's condition, on the latent grid) -> draw
seeded latent noise -> DDIM sampling in which the prior, steered by the ControlNet, runs window by window over the
latent (condition windows aligned with them) -> windowed decode -> back to the input's units -> atomic NIfTI
write. Memory is bounded by the window settings.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.bundle import ConfigParser
from monai.engines import Evaluator
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import Scheduler
from monai.utils import ensure_tuple_rep
from scripts.autoencoder import (
    decode_volume,
    downsample_factors,
    encode_volume,
    latent_roi,
    pad_for,
    per_axis,
    tiled_apply,
)
from scripts.baselines import resample
from scripts.degradations import kspace_truncate
from scripts.dicom import new_template, series_template, write_series
from scripts.diffusion import ControlledDenoiser, unet_divisor
from scripts.engine import autocast, prepare_network, run_network
from scripts.errors import InputError, OutputExistsError
from scripts.grid import apply_along_axis, axis_positions, profile_matrix
from scripts.intensity import denormalize, intensity_params, normalize
from scripts.least_squares import BLUR_KERNELS, deblur
from scripts.options import flag
from scripts.volumes import load_volume, save_volume, spacing_of
from tqdm import tqdm

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
DICOM_DESCRIPTION = "enhanced by latent diffusion (research use only)"
# what a same-grid input suffers from (``--degradation``): random noise, in-plane k-space truncation (MR
# acquired at a lower matrix and zero-filled to the grid), or a known blur (``--kernel``, ``--sigma_mm``); each has
# its own restoration network
DEGRADATIONS = ("noise", "kspace", "blur")


def inference_parser(config_files: Sequence[str], load_networks: bool = True, **overrides) -> ConfigParser:
    """The parsed main-job configs (paths relative to the bundle root, like ``monai.bundle run`` from there) with
    ``overrides``, for callers that need its ``networks`` (loaded now unless ``load_networks=False``) or settings
    outside ``monai.bundle run``."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in config_files])
    parser.read_meta(str(ROOT / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(ROOT), **overrides})
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs name configs/common.json relative to the bundle root
    try:
        parser.parse()
        if load_networks:
            parser.get_parsed_content("networks")  # resolve now, while relative paths still hold
    finally:
        os.chdir(cwd)
    return parser


def space_to_depth(x: torch.Tensor, f: int | Sequence[int]) -> torch.Tensor:
    """``(B, C, fX, fY, fZ)`` -> ``(B, C*fx*fy*fz, X, Y, Z)``: image-resolution data on the latent grid (``f`` per
    axis or for all)."""
    (fx, fy, fz), (b, c, *s) = per_axis(f, int), x.shape
    x = x.reshape(b, c, s[0] // fx, fx, s[1] // fy, fy, s[2] // fz, fz)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * fx * fy * fz, s[0] // fx, s[1] // fy, s[2] // fz)


def depth_to_space(x: torch.Tensor, f: int | Sequence[int]) -> torch.Tensor:
    """Inverse of ``space_to_depth``."""
    (fx, fy, fz), (b, c, *s) = per_axis(f, int), x.shape
    c0 = c // (fx * fy * fz)
    x = x.reshape(b, c0, fx, fy, fz, *s).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c0, s[0] * fx, s[1] * fy, s[2] * fz)


def resolve_modality(image: torch.Tensor, modality: str | None) -> str:
    """``ct`` or ``mr``: as asked, else from the DICOM header, else CT."""
    modality = (modality or str(getattr(image, "meta", {}).get("modality", "")).lower() or "ct").lower()
    if modality not in ("ct", "mr"):
        raise InputError(f"--modality: must be 'ct' or 'mr', got {modality!r}")
    return modality


def target_spacing_of(image: torch.Tensor, target_spacing: Sequence[float] | None) -> list[float]:
    """The requested output spacing, or the input's (pure restoration); refuses non-positive values."""
    if target_spacing is None or (isinstance(target_spacing, str) and not target_spacing.strip()):
        return spacing_of(image.affine).tolist()
    values = json.loads(target_spacing) if isinstance(target_spacing, str) else target_spacing
    values = [float(v) for v in values]
    if len(values) != 3 or not all(np.isfinite(values)) or min(values) <= 0:
        raise InputError(f"--target_spacing: must be three positive numbers in mm, got {target_spacing}")
    return values


@torch.no_grad()
def sample_latent(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: Scheduler,
    condition: torch.Tensor,
    latent_channels: int,
    fold: int | Sequence[int],
    num_inference_steps: int,
    generator: torch.Generator,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    halo: int = 4,
    progress: bool = True,
    unit: int = 1,
    strength: float = 1.0,
    start: torch.Tensor | None = None,
    amp: bool = True,
) -> torch.Tensor:
    """DDIM sampling of a latent for a padded ``condition``: the encoded condition on the latent grid
    (``fold=1``), or the normalised image ``(1, 1, fX, fY, fZ)`` for a ControlNet trained on images (``fold``, the
    autoencoder's downsampling per axis). ``denoiser`` maps (latent, timesteps, condition) to the noise prediction
    (``ControlledDenoiser`` or its TorchScript export).

    At each step the noise prediction is computed window by window over the whole latent (``tiled_apply``), with
    the condition (an image folded onto the latent grid) alongside, so that each window sees its own part of it.
    Windows, steps and the halo are multiples of ``unit`` latent voxels (``unet_divisor``; the latent must be one
    too), so that every window, clipped at the volume's edge or not, fits the UNet's downsampling.

    ``strength < 1`` starts from the input's scaled latent ``start`` (by default the condition, when it is the
    encoded input) noised to the first of the last ``strength`` fraction of the steps, and runs only those
    (SDEdit): fewer steps, and an output tied closer to the input. ``amp``: the denoiser under ``scripts.engine``'s
    autocast (float16 on CUDA, bfloat16 on a CPU); the latent and the scheduler stay float32.
    """
    device = condition.device
    cond = space_to_depth(condition, fold)
    z = torch.randn((1, latent_channels, *cond.shape[2:]), generator=generator).to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    if 0 < strength < 1 and start is None and (per_axis(fold, int) != [1, 1, 1] or cond.shape[1] != latent_channels):
        raise InputError(
            "--strength: below 1 it starts from the encoded input: give it as start, or use encode_condition"
        )
    timesteps, z = start_steps(scheduler, z, cond if start is None else start.to(device), strength)

    def predict(window: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        zw, cw = window[:, :latent_channels], depth_to_space(window[:, latent_channels:], fold)
        return run_network(denoiser, zw, device, amp, t.reshape(1).to(device), cw)

    for t in tqdm(timesteps, desc="denoising steps", disable=not progress):
        noise_pred = tiled_apply(lambda w: predict(w, t), torch.cat([z, cond], 1), roi_size, 1.0, overlap, halo, unit)
        z, _ = scheduler.step(noise_pred, int(t), z)
    return z


def start_steps(
    scheduler, noise: torch.Tensor, latent: torch.Tensor | None, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The timesteps to run (the scheduler's, set beforehand) and the latent to start from: all of them from
    ``noise`` for ``strength`` 1, else the last ``strength`` fraction from ``latent`` noised to the first of them
    (SDEdit). ``latent`` is only read when ``strength < 1``."""
    if not 0 < strength <= 1:
        raise InputError(f"--strength: must be in (0, 1], got {strength}")
    timesteps = scheduler.timesteps
    if strength == 1:
        return timesteps, noise
    timesteps = timesteps[len(timesteps) - max(1, round(len(timesteps) * strength)) :]
    return timesteps, scheduler.add_noise(original_samples=latent, noise=noise, timesteps=timesteps[:1])


def enhance_volume(
    image: torch.Tensor,
    networks: dict,
    target_spacing: Sequence[float] | None = None,
    modality: str | None = None,
    num_inference_steps: int = 20,
    seed: int = 0,
    num_samples: int = 1,
    sliding_window: dict | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    method: str = "diffusion",
    consistency: bool = False,
    strength: float = 1.0,
    residual_decoding: bool = False,
    amp: bool = False,
    degradation: str = "noise",
    kernel: str = "gaussian",
    sigma_mm: float = 1.0,
    kspace_factor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray, str]:
    """Enhance a loaded ``(1, X, Y, Z)`` MetaTensor; return the mean, the std map (``num_samples > 1``), the
    output affine and the modality used. Values are in the input's units.

    ``method='regression'`` runs the supervised peer with MONAI's sliding window on the same condition instead of
    the latent ControlNet: ``networks['restoration']`` (the same-grid specialist of the modality: noise, blur)
    when the grid does not change and it is given, else ``networks['regression']`` (through-plane super-resolution; see
    ``regression_for``). With ``method='diffusion'`` and such a network (``--two_stage true``), the chain is
    two-stage (DiffBIR-style): the regression network removes the degradation
    first, and the ControlNet's condition, the SDEdit start and the residual-decoding base are its output
    (``r + D(z) - D(E(r))``), so that sampling adds what regression averages away. ``consistency=True`` ends
    either method with ``data_consistency`` against the input (super-resolution: the input's slices are
    box-profile slabs of the output grid).
    ``strength < 1`` starts sampling from the noised encoded input (see ``sample_latent``).
    ``residual_decoding=True`` returns ``c + D(z) - D(E(c))`` for the input ``c`` on the output grid instead of
    ``D(z)``: the sample changes the input by what it changes in the latent, and detail the autoencoder cannot
    reproduce is taken from the input rather than lost (one more windowed decode per volume).
    ``amp=True`` runs the networks under ``scripts.engine``'s autocast (float16 on CUDA, bfloat16 with channels-last
    on a CPU); intensities, latents and the returned volume stay float32.
    ``degradation`` names what a same-grid input suffers from (``DEGRADATIONS``), which picks the restoration
    network: the modality's denoiser for ``noise``, its ``<modality>_kspace`` network for ``kspace``. For ``blur``
    the input first gets the known-kernel least squares (``scripts.least_squares.deblur``: ``kernel`` gaussian or
    box, ``sigma_mm`` its sigma or width), which the ``<modality>_blur`` network then refines. For ``kspace`` with
    the truncation factor known (``kspace_factor``), ``consistency=True`` gives the output the input's k-space
    where the input holds it (``kspace_consistency``).
    """
    device = torch.device(device)
    sw = {"roi_size": [256, 256, 32], "overlap": 0.25, "sampling_overlap": 0.5, **(sliding_window or {})}
    if method not in ("diffusion", "regression"):
        raise InputError(f"--method: must be 'diffusion' or 'regression', got {method!r}")
    if residual_decoding and method == "regression":
        raise InputError("--residual_decoding: applies to the latent method; the regression peer is residual already")
    if degradation == "blur" and (kernel not in BLUR_KERNELS or not float(sigma_mm) > 0):
        raise InputError(
            f"--kernel, --sigma_mm: a blur is {' or '.join(BLUR_KERNELS)} of a size > 0 mm, got {kernel!r} of "
            f"{sigma_mm}"
        )
    if degradation == "kspace" and kspace_factor is not None and not float(kspace_factor) >= 1:
        raise InputError(f"--kspace_factor: the in-plane truncation factor is >= 1, got {kspace_factor}")
    modality = resolve_modality(image, modality)
    spacing = target_spacing_of(image, target_spacing)

    def consistent(out: torch.Tensor) -> torch.Tensor:
        observed = image.as_tensor()[0].float()
        if degradation == "kspace" and kspace_factor is not None:
            return kspace_consistency(out, observed, float(kspace_factor))
        return data_consistency(out, observed)

    same_grid = bool(np.allclose(spacing, spacing_of(image.affine)))
    # stage A: the regression method's network, or the two-stage chain's (the one-stage latent chain has none)
    two_stage = method == "diffusion" and networks.get("regression") is not None
    peer = regression_for(networks, same_grid, modality, degradation) if method == "regression" or two_stage else None
    if same_grid:
        condition, affine = image.as_tensor().float(), np.asarray(image.affine)
    else:
        condition, affine = resample(image.as_tensor().float(), np.asarray(image.affine), spacing, "trilinear")
    params = intensity_params(image.as_tensor(), modality)
    x = normalize(condition, params)[None].to(device)
    if peer is not None and degradation == "blur":  # the blur network refines the known kernel's least squares
        t0 = time.perf_counter()
        x = deblur(x.float().cpu(), spacing_of(image.affine), float(sigma_mm), kernel).to(device)
        logger.info("least squares for the %s blur of %g mm: %.1f s", kernel, float(sigma_mm), time.perf_counter() - t0)
    if method == "regression":
        if peer is None:
            raise InputError("--method regression: no regression network given (networks 'regression'/'restoration')")
        out = denormalize(regress(peer, x, sw, device, amp, progress, networks.get("inferer"))[0].cpu(), params)
        if consistency:
            out = consistent(out)
        return physical_range(out, image, modality), None, affine, modality
    if peer is not None:  # two-stage: the ControlNet restores regression's output
        x = regress(peer, x, sw, device, amp, progress, networks.get("inferer"))
    ae: AutoencoderKL = networks["autoencoder"].eval()
    denoiser = (
        networks["denoiser"]
        if "denoiser" in networks
        else ControlledDenoiser(networks["diffusion"], networks["controlnet"])
    ).eval()
    unit = unet_divisor(networks["diffusion"]) if "diffusion" in networks else int(networks["latent_multiple"])
    padded, crop = pad_for(ae, x, unit)
    window = latent_roi(ae, sw["roi_size"])
    fold, image_in, base, start = downsample_factors(ae), padded, None, None
    encoded = networks.get("encode_condition", False)
    if encoded or residual_decoding or strength < 1:
        with autocast(device, amp):
            latent = encode_volume(ae, padded, sw["roi_size"], sw["overlap"], progress=progress).float()
        if residual_decoding:  # D(E(c)), decoded as the samples are, so that the decoder's loss cancels
            base = decode_volume(ae, latent, window, sw["overlap"], progress=progress).float()
        start = latent * networks["scale_factor"]
        if encoded:
            padded, fold = start, 1
    samples = []
    for k in range(max(1, int(num_samples))):
        gen = torch.Generator().manual_seed(int(seed) + k)
        z = sample_latent(
            denoiser,
            networks["scheduler"],
            padded,
            ae.latent_channels,
            fold,
            num_inference_steps,
            gen,
            window,
            sw["sampling_overlap"],
            progress=progress,
            unit=unit,
            strength=strength,
            start=start,
            amp=amp,
        )
        decoded = decode_volume(ae, z / networks["scale_factor"], window, sw["overlap"], progress=progress)
        if base is not None:
            decoded = image_in + decoded.float() - base
        out = denormalize(decoded[crop][0].float().cpu(), params)
        if consistency:
            out = consistent(out)
        samples.append(physical_range(out, image, modality))
    stack = torch.stack(samples)
    std = stack.std(0) if len(samples) > 1 else None
    return stack.mean(0), std, affine, modality


def restoration_key(modality: str, degradation: str = "noise") -> str:
    """The key of ``networks['restoration']`` for a modality and a same-grid degradation: ``ct``/``mr`` for noise,
    ``<modality>_<degradation>`` otherwise."""
    return modality if degradation == "noise" else f"{modality}_{degradation}"


def regression_for(
    networks: dict, same_grid: bool, modality: str, degradation: str = "noise"
) -> torch.nn.Module | None:
    """The regression network for a volume: the same-grid restoration specialist (``networks['restoration']``, a
    network or one per modality and degradation: ``ct``, ``mr`` for noise, ``mr_kspace``, ``ct_blur``) when the
    grid does not change and it is given, else ``networks['regression']`` (the super-resolution specialist, which
    also serves same-grid noisy volumes when no denoiser is given). A degradation other than noise needs its own
    network and the input's grid."""
    if degradation not in DEGRADATIONS:
        raise InputError(f"--degradation: must be one of {', '.join(DEGRADATIONS)}, got {degradation!r}")
    key = restoration_key(modality, degradation)
    restoration = networks.get("restoration")
    if isinstance(restoration, dict):
        restoration = restoration.get(key)
    elif degradation != "noise":
        restoration = None
    if degradation != "noise":
        if not same_grid:
            raise InputError(
                f"--degradation {degradation}: restores a volume on its own grid; drop --target_spacing (thick "
                "slices are the super-resolution network's) or use --degradation noise"
            )
        if restoration is None:
            raise InputError(
                f"--degradation {degradation}: no {modality.upper()} network for it (restoration_{key}.pt in "
                "ckpt_dir)"
            )
    if same_grid and restoration is not None:
        return restoration
    return networks.get("regression")


@torch.no_grad()
def regress(
    peer: torch.nn.Module,
    x: torch.Tensor,
    sliding_window: dict,
    device: torch.device,
    amp: bool = False,
    progress: bool = False,
    inferer: SlidingWindowInferer | None = None,
) -> torch.Tensor:
    """The regression network over a normalised ``(1, 1, X, Y, Z)`` volume with MONAI's sliding window:
    ``inferer`` (the main job's ``inferer``), else a Gaussian-weighted one with ``sliding_window``'s ``roi_size``
    and ``overlap``; float32 out. The window is clipped to the volume, so that a small volume runs as one window
    instead of being padded up to the window (an 80x80x48 MR took 23 s in a 256x256 window); a non-positive size
    (the main job's default) takes the volume's whole extent. The network is prepared for the device
    (``scripts.engine.prepare_network``: channels-last weights for bfloat16 on a CPU, 2.3x faster there)."""
    if inferer is None:
        inferer = SlidingWindowInferer(
            sliding_window["roi_size"], sw_batch_size=1, overlap=sliding_window["overlap"], mode="gaussian"
        )
    inferer = copy.copy(inferer)
    inferer.roi_size = tuple(
        int(n) if int(r) <= 0 else min(int(r), int(n))
        for r, n in zip(ensure_tuple_rep(inferer.roi_size, 3), x.shape[2:])
    )
    inferer.progress = progress
    peer = prepare_network(peer, device, amp).eval()
    return inferer(x, lambda t: run_network(peer, t, device, amp)).float()


def physical_range(values: torch.Tensor, image: torch.Tensor, modality: str) -> torch.Tensor:
    """Clip to values the modality can hold: CT from -1024 HU (air) up to the larger of 3071 HU and the
    input's maximum (metal), MR from 0 (a magnitude image)."""
    if modality == "ct":
        return values.clamp(-1024.0, max(3071.0, float(image.max())))
    return values.clamp(min=0.0)


def slab_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_in, n_out)`` matrix that averages an output grid back onto the input grid along one axis: input voxel
    ``k`` is the box-profile mean of the output voxels it covers (the FOV convention of ``scripts.grid``)."""
    factor = n_out / n_in
    return profile_matrix(n_out, axis_positions(n_in, factor, 0.5 * factor - 0.5), factor, "box")


def data_consistency(output: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Project ``output`` onto the volumes whose box-profile average on the input grid equals ``observed``:
    ``x + A^+ (y - A x)`` with the separable slab operator ``A`` of each resampled axis, so re-degrading the
    result gives the input back exactly. Axes on the same grid are left alone; with none resampled (denoising,
    deblurring) there is no slab operator and ``output`` is returned as it is: the projection onto the identity
    would return the degraded input itself."""
    mats = [None if o == i else slab_matrix(i, o) for i, o in zip(observed.shape[-3:], output.shape[-3:])]
    if all(m is None for m in mats):
        logger.info("data consistency: the output is on the input's grid (no slab to match), skipped")
        return output
    residual = observed.double()
    projected = output.double()
    for axis, m in enumerate(mats):
        if m is not None:
            projected = apply_along_axis(projected, m, projected.ndim - 3 + axis)
    residual = residual - projected
    for axis, m in enumerate(mats):
        if m is not None:
            residual = apply_along_axis(residual, np.linalg.pinv(m), residual.ndim - 3 + axis)
    return (output.double() + residual).to(output.dtype)


def kspace_consistency(output: torch.Tensor, observed: torch.Tensor, factor: float) -> torch.Tensor:
    """Give ``output`` the in-plane k-space of ``observed`` where ``observed`` holds it (the central ``1/factor``,
    ``scripts.degradations.kspace_truncate``) and keep its own elsewhere: the projection ``x + P (y - x)`` onto the
    volumes that truncate to the input, which cannot move the output away from a truth the input was cut from."""
    return output + kspace_truncate(observed.to(output.dtype) - output, factor)


def output_dtype(modality: str) -> str:
    """How an enhanced volume is stored: integer HU for CT, float32 for MR."""
    return "int16" if modality == "ct" else "float32"


def enhance(
    input_image: str,
    output_image: str,
    networks: dict,
    target_spacing: Sequence[float] | str | None = None,
    modality: str | None = None,
    num_inference_steps: int = 20,
    seed: int = 0,
    num_samples: int = 1,
    sliding_window: dict | None = None,
    device: str | torch.device = "cpu",
    series_uid: str | None = None,
    method: str = "diffusion",
    consistency: bool = False,
    output_dicom: str = "",
    strength: float = 1.0,
    residual_decoding: bool = False,
    amp: bool = False,
    degradation: str = "noise",
    kernel: str = "gaussian",
    sigma_mm: float = 1.0,
    kspace_factor: float | None = None,
) -> dict:
    """Enhance one file or DICOM series into ``output_image`` (NIfTI, atomic), plus ``*_std.nii.gz`` when
    ``num_samples > 1`` and a derived DICOM series in the folder ``output_dicom`` when given (patient and study
    tags from the input series, or a new anonymous study for a file input). The input is only read; after a
    failure no output is left."""
    if not str(output_image).endswith((".nii", ".nii.gz")):
        raise InputError(f"{output_image}: the output must be a NIfTI file (.nii.gz or .nii)")
    if output_dicom and Path(output_dicom).exists() and any(Path(output_dicom).iterdir()):
        raise OutputExistsError(f"{output_dicom}: the DICOM output folder exists and is not empty")
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    image = load_volume(input_image, series_uid=series_uid)
    mean, std, affine, modality = enhance_volume(
        image,
        networks,
        target_spacing,
        modality,
        num_inference_steps,
        seed,
        num_samples,
        sliding_window,
        device,
        method=method,
        consistency=consistency,
        strength=strength,
        residual_decoding=residual_decoding,
        amp=amp,
        degradation=degradation,
        kernel=kernel,
        sigma_mm=sigma_mm,
        kspace_factor=kspace_factor,
    )
    outputs = {}
    try:
        if output_dicom:
            template = (
                series_template(input_image, series_uid) if Path(input_image).is_dir() else new_template(modality)
            )
            write_series(
                mean, affine, template, output_dicom, description=DICOM_DESCRIPTION, integer_values=modality == "ct"
            )
            outputs["dicom"] = str(output_dicom)
        save_volume(mean, affine, output_image, dtype=output_dtype(modality))
        outputs["output"] = str(output_image)
        if std is not None:
            std_path = str(output_image).removesuffix(".gz").removesuffix(".nii") + "_std.nii.gz"
            save_volume(std, affine, std_path, dtype="float32")
            outputs["std"] = std_path
    except BaseException:
        for key, path in outputs.items():
            if key == "dicom":
                shutil.rmtree(path, ignore_errors=True)
            else:
                Path(path).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    logger.info(
        "enhanced %s -> %s in %.1f s, peak %s memory %.2f GiB",
        input_image,
        output_image,
        seconds,
        "GPU" if torch.cuda.is_available() else "process",
        peak,
    )
    return {
        **outputs,
        "seconds": seconds,
        "modality": modality,
        "shape": list(mean.shape),
        "spacing": spacing_of(affine).tolist(),
    }


def enhance_datalist(
    datalist: str,
    output_dir: str,
    networks: dict,
    keys: Sequence[str] = ("training", "validation", "testing"),
    **kwargs,
) -> str:
    """Enhance every image of an Auto3DSeg datalist into ``output_dir`` and write the matching datalist there:
    the same entries, folds and labels, with ``image`` pointing at the enhanced volumes.

    Under ``torchrun`` (``configs/multi_gpu_inference.json``: a process group is initialised) rank ``r`` of ``n``
    enhances the images ``r, r + n, ...`` of the whole list; every rank names the outputs the same way, and rank 0
    writes the datalist once all ranks are done."""
    from scripts.datalist import read_datalist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    src = json.loads(Path(datalist).read_text())
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    new = {k: v for k, v in src.items() if k not in keys}
    new["dataroot"] = str(out.resolve())
    used: set[str] = set()
    index = 0
    for key in keys:
        if not src.get(key):
            continue
        entries = read_datalist(datalist, key)
        new[key] = []
        for original, item in zip(src[key], entries):
            stem = Path(str(item["image"]).rstrip("/")).name.split(".")[0]
            name, k = f"{stem}_enhanced.nii.gz", 0
            while name in used:  # same file name in another folder
                k += 1
                name = f"{stem}_{k}_enhanced.nii.gz"
            used.add(name)
            if index % world == rank:
                enhance(item["image"], str(out / name), networks, **kwargs)
            index += 1
            entry = dict(original)
            entry["image"] = name
            if "label" in item:
                entry["label"] = item["label"]  # absolute: labels stay where they are
            new[key].append(entry)
    target = out / "datalist_enhanced.json"
    if world > 1:
        dist.barrier()  # every image written before the list that names them
    if rank == 0:
        target.write_text(json.dumps(new, indent=2))
    return str(target)


def run(input_image: str = "", output_image: str = "", datalist: str = "", output_dir: str = "", **kwargs):
    """The bundle's entry point: one volume (``input_image`` -> ``output_image``) or batch mode (``datalist``)."""
    for key, option in (
        ("consistency", "data_consistency"),
        ("residual_decoding", "residual_decoding"),
        ("amp", "amp"),
    ):
        if key in kwargs:
            kwargs[key] = flag(kwargs[key], option)
    if datalist:
        if not output_dir:
            raise InputError("--datalist: batch mode needs --output_dir")
        if kwargs.pop("output_dicom", ""):
            raise InputError("--output_dicom: writes one series; it does not apply to batch mode")
        return enhance_datalist(datalist, output_dir, **kwargs)
    if not input_image or not output_image:
        raise InputError("--input_image, --output_image: give both (or --datalist and --output_dir)")
    return enhance(input_image, output_image, **kwargs)


class JobEvaluator(Evaluator):
    """MONAI's ``Evaluator`` over a dataset of jobs: each item's entries are keyword arguments of ``job``. In
    ``configs/inference.json`` the dataset holds the command line's volume (or datalist, in batch mode) and ``job``
    is ``run`` with the networks and settings: the main job is then the model zoo's inference workflow
    (``dataset``, ``evaluator``, ``inferer``) and takes Ignite handlers. A job's result is ``state.output``."""

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        job: Callable[..., dict | str],
        val_handlers: Sequence | None = None,
    ) -> None:
        super().__init__(
            device=torch.device(device), val_data_loader=val_data_loader, val_handlers=val_handlers, decollate=False
        )
        self.job = job

    def _iteration(self, engine: Evaluator, batchdata: dict) -> dict | str:
        return self.job(**batchdata)


def single_item(items: list[dict]) -> dict:
    """``collate_fn`` for a job ``DataLoader`` of batch size 1: the job's entries as they are (paths stay strings)."""
    return items[0]
