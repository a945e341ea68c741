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
from scripts.errors import InputError, MissingFileError
from tqdm import tqdm

SCALE_FILE = "autoencoder_scale.json"


def downsample_factor(autoencoder: AutoencoderKL) -> int:
    """In-plane spatial downsampling of the encoder: 2 per level after the first (or an exported one's
    ``downsample``)."""
    if hasattr(autoencoder, "downsample"):
        return int(autoencoder.downsample)
    return 2 ** (len(autoencoder.encoder.channels) - 1)


def downsample_factors(autoencoder: AutoencoderKL) -> tuple[int, int, int]:
    """Downsampling along each axis of a volume: ``(f, f, f)`` for a 3D autoencoder, ``(f, f, 1)`` for a
    ``SliceAutoencoderKL``, which keeps every slice."""
    f = downsample_factor(autoencoder)
    return (f, f, 1) if getattr(autoencoder, "slice_wise", False) else (f, f, f)


class SliceAutoencoderKL(AutoencoderKL):
    """A 2D ``AutoencoderKL`` run slice by slice along the last axis of a volume (2.5D).

    Volumes ``(B, C, X, Y, Z)`` encode to latents ``(B, L, X/f, Y/f, Z)`` that keep every slice of the grid, so
    thick-slice data lose nothing through-plane to the autoencoder; the 3D prior and ControlNet work on that
    latent and restore the through-plane structure. 4D input ``(B, C, X, Y)`` passes as to a 2D autoencoder, and
    the state dict is that of a plain 2D ``AutoencoderKL``.
    """

    slice_wise = True

    def __init__(self, **kwargs) -> None:
        kwargs.pop("spatial_dims", None)
        super().__init__(spatial_dims=2, **kwargs)

    @staticmethod
    def fold_slices(x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> ``(B * Z, C, X, Y)``: every slice as a 2D image (also the exported halves')."""
        return x.movedim(-1, 1).reshape(-1, *x.shape[1:4])

    @staticmethod
    def unfold_slices(y: torch.Tensor, batch: int) -> torch.Tensor:
        """The inverse of ``fold_slices`` for ``batch`` volumes."""
        return y.reshape(batch, -1, *y.shape[1:]).movedim(1, -1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim == 4:
            return super().encode(x)
        mu, sigma = super().encode(self.fold_slices(x))
        return self.unfold_slices(mu, x.shape[0]), self.unfold_slices(sigma, x.shape[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim == 4:
            return super().decode(z)
        return self.unfold_slices(super().decode(self.fold_slices(z)), z.shape[0])


def slice_wise_target(target: str) -> bool:
    """Whether a config's ``autoencoder_def#_target_`` names ``SliceAutoencoderKL`` (for configs that need the
    latent grid without building the network)."""
    return target.rsplit(".", 1)[-1] == SliceAutoencoderKL.__name__


class ReconstructionInferer(Inferer):
    """Whole-volume reconstruction through ``reconstruct_volume``, for evaluators: the same windowed path as
    inference, so validation measures what users get."""

    def __init__(
        self, roi_size: Sequence[int] = (128, 128, 32), overlap: float = 0.25, amp: bool | str = False
    ) -> None:
        super().__init__()
        self.roi_size, self.overlap, self.amp = roi_size, overlap, amp

    def __call__(self, inputs: torch.Tensor, network: AutoencoderKL, *args, **kwargs) -> torch.Tensor:
        from scripts.engine import autocast

        with autocast(inputs.device, self.amp):
            return reconstruct_volume(network, inputs, self.roi_size, self.overlap).float()


def _starts(size: int, roi: int, step: int) -> list[int]:
    starts = list(range(0, max(size - roi, 0) + 1, max(step, 1)))
    if starts[-1] != max(size - roi, 0):
        starts.append(size - roi)
    return starts


def per_axis(value: float | Sequence[float], cast: type = float) -> list:
    """``value`` for each of the three spatial axes: a sequence as it is, a number repeated."""
    return [cast(v) for v in value] if isinstance(value, Sequence) else [cast(value)] * 3


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    roi_size: Sequence[int],
    scale: float | Sequence[float],
    overlap: float = 0.25,
    halo: int | Sequence[int] = 0,
    unit: int | Sequence[int] = 1,
    progress: bool = False,
) -> torch.Tensor:
    """Apply ``fn`` (output ``scale`` times the input's size, per axis or for all) to ``(B, C, X, Y, Z)`` window
    by window.

    Each window is read with ``halo`` extra input voxels of real context on every side (clamped at the volume's
    edges), and only its central part is kept, so zero padding inside ``fn`` never reaches the kept output.
    Kept parts overlap by ``overlap`` and are blended with Gaussian weights. Window sizes, steps and the halo are
    multiples of ``unit`` input voxels (the downsampling factor when encoding), so every window maps onto whole
    output voxels. Memory is bounded by ``roi_size + 2 * halo``, not by the volume. Gradients flow through it
    when enabled (posterior sampling wraps ``fn`` in activation checkpointing to keep that bound).
    """
    size = x.shape[2:]
    scale, units = per_axis(scale), per_axis(unit, int)
    halos = [-(-h // u) * u for h, u in zip(per_axis(halo, int), units)]  # rounded up to whole units
    roi = [min(int(r), int(s)) // u * u or int(s) for r, s, u in zip(roi_size, size, units)]
    steps = [max(u, int(r * (1 - overlap)) // u * u) for r, u in zip(roi, units)]
    grid = list(itertools.product(*[_starts(int(s), r, st) for s, r, st in zip(size, roi, steps)]))
    out_roi = [int(round(r * sc)) for r, sc in zip(roi, scale)]
    weight = compute_importance_map(out_roi, mode="gaussian", sigma_scale=0.125, device=x.device).to(x.dtype)
    out = norm = None
    for start in tqdm(grid, desc="windows", disable=not progress, leave=False):
        lo = [max(0, st - h) for st, h in zip(start, halos)]
        hi = [min(int(s), st + r + h) for s, st, r, h in zip(size, start, roi, halos)]
        y = fn(x[(slice(None), slice(None), *[slice(a, b) for a, b in zip(lo, hi)])])
        keep = [
            slice(int(round((st - a) * sc)), int(round((st - a) * sc)) + o)
            for st, a, o, sc in zip(start, lo, out_roi, scale)
        ]
        y = y[(slice(None), slice(None), *keep)]
        if out is None:
            shape = (x.shape[0], y.shape[1], *[int(round(s * sc)) for s, sc in zip(size, scale)])
            out, norm = x.new_zeros(shape), x.new_zeros(shape[2:])
        target = tuple(slice(int(round(st * sc)), int(round(st * sc)) + o) for st, o, sc in zip(start, out_roi, scale))
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
    """Latent means ``(B, C_lat, X/f, Y/f, Z/f)`` (``Z`` for a slice-wise autoencoder) of a padded
    ``(B, 1, X, Y, Z)`` image (see ``pad_for``)."""
    fs = downsample_factors(autoencoder)
    return tiled_apply(
        lambda t: autoencoder.encode(t)[0],
        image,
        roi_size,
        [1 / f for f in fs],
        overlap,
        [halo // f * f if f > 1 else 0 for f in fs],
        fs,
        progress,
    )


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
    fs = downsample_factors(autoencoder)
    return tiled_apply(
        autoencoder.decode, latent, roi_size, fs, overlap, [halo if f > 1 else 0 for f in fs], 1, progress
    )


def pad_for(
    autoencoder: AutoencoderKL, image: torch.Tensor, latent_multiple: int = 1
) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Edge-pad the spatial dims of ``(B, C, X, Y, Z)`` so that the latent grid is a whole number of voxels, and
    a multiple of ``latent_multiple`` (what a diffusion UNet downsampling the latent needs); also return the
    slices that crop the result back."""
    shape = image.shape[2:]
    pad = DivisiblePad(k=[f * int(latent_multiple) for f in downsample_factors(autoencoder)], mode="edge", method="end")
    padded = torch.stack([torch.as_tensor(pad(im)).as_subclass(torch.Tensor) for im in image])
    return padded, (slice(None), slice(None), *[slice(0, n) for n in shape])


def reconstruct_volume(
    autoencoder: AutoencoderKL, image: torch.Tensor, roi_size: Sequence[int] = (128, 128, 32), overlap: float = 0.25
) -> torch.Tensor:
    """Encode and decode a whole volume window by window; same shape as ``image``."""
    padded, crop = pad_for(autoencoder, image)
    z = encode_volume(autoencoder, padded, roi_size, overlap)
    return decode_volume(autoencoder, z, latent_roi(autoencoder, roi_size), overlap)[crop]


def latent_roi(autoencoder: AutoencoderKL, roi_size: Sequence[int]) -> list[int]:
    """The latent window that an image window ``roi_size`` maps onto."""
    return [max(1, int(r) // f) for r, f in zip(roi_size, downsample_factors(autoencoder))]


def latent_affine(autoencoder: AutoencoderKL, affine: np.ndarray) -> np.ndarray:
    """Affine of the latent grid of an image with ``affine``: voxels ``f`` times larger, centred on the image
    voxels they cover."""
    fs = downsample_factors(autoencoder)
    out = np.asarray(affine) @ np.diag([*fs, 1.0])
    out[:3, 3] = (np.asarray(affine) @ np.array([(f - 1) / 2 for f in fs] + [1.0]))[:3]
    return out


@torch.no_grad()
def latent_scale_factor(
    autoencoder: AutoencoderKL, batches: Iterable, device: torch.device | str = "cpu", max_batches: int = 20
) -> float:
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


def save_scale_factor(
    autoencoder: AutoencoderKL,
    batches: Iterable,
    ckpt_dir: str,
    device: torch.device | str = "cpu",
    max_batches: int = 20,
) -> float:
    """Compute the latent scale factor and write ``ckpt_dir/autoencoder_scale.json`` for the later stages."""
    scale = latent_scale_factor(autoencoder, batches, device, max_batches)
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    (Path(ckpt_dir) / SCALE_FILE).write_text(json.dumps({"scale_factor": scale}, indent=2))
    return scale


def load_scale_factor(ckpt_dir: str) -> float:
    path = Path(ckpt_dir) / SCALE_FILE
    if not path.is_file():
        raise MissingFileError(f"{path}: no latent scale factor; train the autoencoder first")
    return float(json.loads(path.read_text())["scale_factor"])


def load_autoencoder_weights(
    autoencoder: AutoencoderKL, path: str | Path, map_location: str | torch.device = "cpu"
) -> AutoencoderKL:
    """Load weights saved by this bundle (a state dict, or a checkpoint holding ``autoencoder``) or by the old
    MONAI Generative ``AutoencoderKL`` (renamed attention and upsampling layers), with ``weights_only=True``."""
    if not Path(path).is_file():
        raise MissingFileError(
            f"{path}: no autoencoder weights (train stage 1, or point ckpt_dir at them; the bundle ships "
            "only the regression stage so far, which the main job runs without configs/inference_diffusion.json)"
        )
    state = torch.load(path, map_location=map_location, weights_only=True)
    if "autoencoder" in state and isinstance(state["autoencoder"], dict):
        state = state["autoencoder"]
    try:
        autoencoder.load_state_dict(state)
    except RuntimeError as e:
        try:
            autoencoder.load_old_state_dict(dict(state))
        except (RuntimeError, KeyError) as old:
            raise InputError(
                f"{path}: the weights do not fit the configured autoencoder, as this bundle's or as MONAI "
                f"Generative's ({str(e).strip().splitlines()[0]}); give the network config they were trained with"
            ) from old
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
            affine = latent_affine(autoencoder, np.asarray(image.affine))
            name = Path(str(item["image"]).rstrip("/")).name.split(".")[0]
            path = out / f"{name}_latent.pt"
            torch.save(
                {
                    "latent": z,
                    "affine": torch.as_tensor(affine),
                    "intensity": d["image_intensity"],
                    "image_shape": list(image.shape[1:]),
                },
                path,
            )
            new[key].append(
                {**{k: v for k, v in item.items() if k != "image"}, "image": str(item["image"]), "latent": path.name}
            )
    target = out / "datalist_latents.json"
    target.write_text(json.dumps(new, indent=2))
    return str(target)
