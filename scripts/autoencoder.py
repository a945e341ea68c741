"""Whole-volume encode and decode with an AutoencoderKL, window by window, and the latent scale factor.

Volumes of any size are padded (edge values) to a multiple of the autoencoder's downsampling factor, encoded
window by window into latents 1/factor the size, decoded the same way back, and cropped. Each window carries a
halo of real context that is discarded after the network, so the convolutions' zero padding leaves no seams;
kept parts are blended with Gaussian weights. Memory is bounded by the window size, not by the volume.
GroupNorm statistics are still per window, so a windowed result differs slightly from a whole-volume pass
(``tests/test_autoencoder.py`` states the tolerance).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import Inferer
from monai.networks.nets import AutoencoderKL
from monai.transforms import DivisiblePad
from tqdm import tqdm

SCALE_FILE = "autoencoder_scale.json"


def downsample_factor(autoencoder: AutoencoderKL) -> int:
    """Spatial downsampling of the encoder: 2 per level after the first (or an exported one's ``downsample``)."""
    if hasattr(autoencoder, "downsample"):
        return int(autoencoder.downsample)
    return 2 ** (len(autoencoder.encoder.channels) - 1)


class ReconstructionInferer(Inferer):
    """Whole-volume reconstruction through ``reconstruct_volume``, for evaluators: the same windowed path as
    inference, so validation measures what users get."""

    def __init__(self, roi_size: Sequence[int] = (128, 128, 32), overlap: float = 0.25) -> None:
        super().__init__()
        self.roi_size, self.overlap = roi_size, overlap

    def __call__(self, inputs: torch.Tensor, network: AutoencoderKL, *args, **kwargs) -> torch.Tensor:
        return reconstruct_volume(network, inputs, self.roi_size, self.overlap)


def _starts(size: int, roi: int, step: int) -> list[int]:
    starts = list(range(0, max(size - roi, 0) + 1, max(step, 1)))
    if starts[-1] != max(size - roi, 0):
        starts.append(size - roi)
    return starts


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    roi_size: Sequence[int],
    scale: float,
    overlap: float = 0.25,
    halo: int = 0,
    unit: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """Apply ``fn`` (output ``scale`` times the input's size) to ``(B, C, X, Y, Z)`` window by window.

    Each window is read with ``halo`` extra input voxels of real context on every side (clamped at the volume's
    edges), and only its central part is kept, so zero padding inside ``fn`` never reaches the kept output.
    Kept parts overlap by ``overlap`` and are blended with Gaussian weights. Window sizes, steps and the halo are
    multiples of ``unit`` input voxels (the downsampling factor when encoding), so every window maps onto whole
    output voxels. Memory is bounded by ``roi_size + 2 * halo``, not by the volume. Gradients flow through it
    when enabled (posterior sampling wraps ``fn`` in activation checkpointing to keep that bound).
    """
    size = x.shape[2:]
    halo = -(-int(halo) // unit) * unit  # rounded up to whole units
    roi = [min(int(r), int(s)) // unit * unit or int(s) for r, s in zip(roi_size, size)]
    steps = [max(unit, int(r * (1 - overlap)) // unit * unit) for r in roi]
    grid = list(itertools.product(*[_starts(int(s), r, st) for s, r, st in zip(size, roi, steps)]))
    out_roi = [int(round(r * scale)) for r in roi]
    weight = compute_importance_map(out_roi, mode="gaussian", sigma_scale=0.125, device=x.device).to(x.dtype)
    out = norm = None
    for start in tqdm(grid, desc="windows", disable=not progress, leave=False):
        lo = [max(0, st - halo) for st in start]
        hi = [min(int(s), st + r + halo) for s, st, r in zip(size, start, roi)]
        y = fn(x[(slice(None), slice(None), *[slice(a, b) for a, b in zip(lo, hi)])])
        keep = [slice(int(round((st - a) * scale)), int(round((st - a) * scale)) + o)
                for st, a, o in zip(start, lo, out_roi)]
        y = y[(slice(None), slice(None), *keep)]
        if out is None:
            shape = (x.shape[0], y.shape[1], *[int(round(s * scale)) for s in size])
            out, norm = x.new_zeros(shape), x.new_zeros(shape[2:])
        target = tuple(slice(int(round(st * scale)), int(round(st * scale)) + o) for st, o in zip(start, out_roi))
        out[(slice(None), slice(None), *target)] += y * weight
        norm[target] += weight
    return out / norm


@torch.no_grad()
def encode_volume(
    autoencoder: AutoencoderKL,
    image: torch.Tensor,
    roi_size: Sequence[int] = (128, 128, 32),
    overlap: float = 0.25,
    halo: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Latent means ``(B, C_lat, X/f, Y/f, Z/f)`` of a padded ``(B, 1, X, Y, Z)`` image (see ``pad_for``)."""
    f = downsample_factor(autoencoder)
    return tiled_apply(lambda t: autoencoder.encode(t)[0], image, roi_size, 1 / f, overlap, halo // f * f, f,
                       progress)


@torch.no_grad()
def decode_volume(
    autoencoder: AutoencoderKL,
    latent: torch.Tensor,
    roi_size: Sequence[int] = (32, 32, 8),
    overlap: float = 0.25,
    halo: int = 4,
    progress: bool = False,
) -> torch.Tensor:
    """Image ``(B, 1, f*X, f*Y, f*Z)`` decoded from latents window by window (``roi_size`` in latent voxels)."""
    return tiled_apply(autoencoder.decode, latent, roi_size, downsample_factor(autoencoder), overlap, halo, 1,
                       progress)


def pad_for(autoencoder: AutoencoderKL, image: torch.Tensor, latent_multiple: int = 1
            ) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Edge-pad the spatial dims of ``(B, C, X, Y, Z)`` so that the latent grid is a whole number of voxels, and
    a multiple of ``latent_multiple`` (what a diffusion UNet downsampling the latent needs); also return the
    slices that crop the result back."""
    f = downsample_factor(autoencoder)
    shape = image.shape[2:]
    pad = DivisiblePad(k=f * int(latent_multiple), mode="edge", method="end")
    padded = torch.stack([torch.as_tensor(pad(im)).as_subclass(torch.Tensor) for im in image])
    return padded, (slice(None), slice(None), *[slice(0, n) for n in shape])


def reconstruct_volume(
    autoencoder: AutoencoderKL,
    image: torch.Tensor,
    roi_size: Sequence[int] = (128, 128, 32),
    overlap: float = 0.25,
) -> torch.Tensor:
    """Encode and decode a whole volume window by window; same shape as ``image``."""
    f = downsample_factor(autoencoder)
    padded, crop = pad_for(autoencoder, image)
    z = encode_volume(autoencoder, padded, roi_size, overlap)
    return decode_volume(autoencoder, z, [max(1, r // f) for r in roi_size], overlap)[crop]


@torch.no_grad()
def latent_scale_factor(autoencoder: AutoencoderKL, batches: Iterable, device: torch.device | str = "cpu",
                        max_batches: int = 20) -> float:
    """``1 / std`` of the latent means over training patches, as in the LDM papers."""
    autoencoder.eval()
    zs = []
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        images = batch["image"] if isinstance(batch, dict) else batch
        zs.append(autoencoder.encode(torch.as_tensor(images).to(device))[0].flatten().float().cpu())
    if not zs:
        raise ValueError("no batches to compute the latent scale factor from")
    return float(1.0 / torch.cat(zs).std())


def save_scale_factor(autoencoder: AutoencoderKL, batches: Iterable, ckpt_dir: str, device: torch.device | str = "cpu",
                      max_batches: int = 20) -> float:
    """Compute the latent scale factor and write ``ckpt_dir/autoencoder_scale.json`` for the later stages."""
    scale = latent_scale_factor(autoencoder, batches, device, max_batches)
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    (Path(ckpt_dir) / SCALE_FILE).write_text(json.dumps({"scale_factor": scale}, indent=2))
    return scale


def load_scale_factor(ckpt_dir: str) -> float:
    path = Path(ckpt_dir) / SCALE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no latent scale factor; train the autoencoder first")
    return float(json.loads(path.read_text())["scale_factor"])


def load_autoencoder_weights(autoencoder: AutoencoderKL, path: str | Path, map_location: str | torch.device = "cpu"
                             ) -> AutoencoderKL:
    """Load weights saved by this bundle (a state dict, or a checkpoint holding ``autoencoder``) or by the old
    MONAI Generative ``AutoencoderKL`` (renamed attention and upsampling layers), with ``weights_only=True``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no autoencoder weights (train stage 1, or point ckpt_dir at them)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if "autoencoder" in state and isinstance(state["autoencoder"], dict):
        state = state["autoencoder"]
    try:
        autoencoder.load_state_dict(state)
    except RuntimeError:
        autoencoder.load_old_state_dict(dict(state))
    return autoencoder


@torch.no_grad()
def prepare_latents(
    autoencoder: AutoencoderKL,
    datalist: str,
    output_dir: str,
    modality: str = "ct",
    roi_size: Sequence[int] = (128, 128, 32),
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
    keys: Sequence[str] = ("training", "validation"),
) -> str:
    """Encode every image of an Auto3DSeg datalist to latent means on disk and write the matching datalist.

    Each ``<name>_latent.pt`` holds ``latent`` ``(C, x, y, z)`` (unscaled: multiply by the scale factor), the
    latent grid's ``affine``, the image's ``intensity`` normalisation and ``image_shape``; entries keep their other
    fields (``fold``, ``label``...) and gain ``latent``.
    """
    from scripts.datalist import read_datalist
    from scripts.intensity import NormalizeIntensityd
    from scripts.volumes import load_volume

    autoencoder.eval().to(device)
    f = downsample_factor(autoencoder)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads(Path(datalist).read_text())
    new = {k: v for k, v in raw.items() if k not in keys}
    new["dataroot"] = str(out.resolve())
    for key in keys:
        if not raw.get(key):
            continue
        new[key] = []
        for item in tqdm(read_datalist(datalist, key), desc=f"encoding {key}"):
            image = load_volume(item["image"])
            d = NormalizeIntensityd("image", default_modality=item.get("modality", modality))({"image": image})
            padded, _ = pad_for(autoencoder, d["image"].as_tensor()[None].to(device))
            z = encode_volume(autoencoder, padded, roi_size, overlap)[0].cpu()
            affine = np.asarray(image.affine) @ np.diag([f, f, f, 1.0])
            affine[:3, 3] = (np.asarray(image.affine) @ np.array([(f - 1) / 2] * 3 + [1.0]))[:3]
            name = Path(str(item["image"]).rstrip("/")).name.split(".")[0]
            path = out / f"{name}_latent.pt"
            torch.save({"latent": z, "affine": torch.as_tensor(affine), "intensity": d["image_intensity"],
                        "image_shape": list(image.shape[1:])}, path)
            new[key].append({**{k: v for k, v in item.items() if k != "image"}, "image": str(item["image"]),
                             "latent": path.name})
    target = out / "datalist_latents.json"
    target.write_text(json.dumps(new, indent=2))
    return str(target)
