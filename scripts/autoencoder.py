"""Whole-volume encode and decode with an AutoencoderKL, window by window, and the latent scale factor.

Volumes of any size are padded (edge values) to a multiple of the autoencoder's downsampling factor, encoded
with a sliding window whose output is 1/factor the size of its input, decoded the same way back, and cropped.
Windows are blended with Gaussian weights, so memory is bounded by ``roi_size`` and ``sw_batch_size``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import AutoencoderKL
from monai.transforms import DivisiblePad

SCALE_FILE = "autoencoder_scale.json"


def downsample_factor(autoencoder: AutoencoderKL) -> int:
    """Spatial downsampling of the encoder: 2 per level after the first."""
    return 2 ** (len(autoencoder.encoder.channels) - 1)


class Reconstructor(torch.nn.Module):
    """``autoencoder.reconstruct`` (mean latent, no sampling) as a module, for evaluators and inferers."""

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.reconstruct(x)


def _inferer(roi_size: Sequence[int], sw_batch_size: int, overlap: float, progress: bool) -> SlidingWindowInferer:
    return SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=sw_batch_size, overlap=overlap,
                                mode="gaussian", progress=progress)


@torch.no_grad()
def encode_volume(
    autoencoder: AutoencoderKL,
    image: torch.Tensor,
    roi_size: Sequence[int] = (96, 96, 64),
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """Latent means ``(B, C_lat, X/f, Y/f, Z/f)`` of a padded ``(B, 1, X, Y, Z)`` image (see ``pad_for``)."""
    return _inferer(roi_size, sw_batch_size, overlap, progress)(image, lambda x: autoencoder.encode(x)[0])


@torch.no_grad()
def decode_volume(
    autoencoder: AutoencoderKL,
    latent: torch.Tensor,
    roi_size: Sequence[int] = (24, 24, 16),
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """Image ``(B, 1, f*X, f*Y, f*Z)`` decoded from latents window by window (``roi_size`` in latent voxels)."""
    return _inferer(roi_size, sw_batch_size, overlap, progress)(latent, autoencoder.decode)


def pad_for(autoencoder: AutoencoderKL, image: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Edge-pad the spatial dims of ``(B, C, X, Y, Z)`` to a multiple of the downsampling factor; also return
    the slices that crop the result back."""
    f = downsample_factor(autoencoder)
    shape = image.shape[2:]
    padded = torch.stack([DivisiblePad(k=f, mode="edge", method="end")(im) for im in image])
    return padded, (slice(None), slice(None), *[slice(0, n) for n in shape])


def reconstruct_volume(
    autoencoder: AutoencoderKL,
    image: torch.Tensor,
    roi_size: Sequence[int] = (96, 96, 64),
    overlap: float = 0.25,
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """Encode and decode a whole volume window by window; same shape as ``image``."""
    f = downsample_factor(autoencoder)
    padded, crop = pad_for(autoencoder, image)
    z = encode_volume(autoencoder, padded, roi_size, overlap, sw_batch_size)
    return decode_volume(autoencoder, z, [max(1, r // f) for r in roi_size], overlap, sw_batch_size)[crop]


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
