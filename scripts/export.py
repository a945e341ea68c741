"""TorchScript export of the networks, and the adapters that let the main job run from the exported files.

What exports how (``docs/README.md`` says why):

- ``regression_def`` scripts (``python -m monai.bundle ckpt_export regression_def ...``);
- the autoencoder's two halves trace (``encoder_def``/``decoder_def`` in ``configs/export.json``, with
  ``--use_trace true``): parameter names match ``models/autoencoder.pt``, so ``ckpt_export`` loads it as is; a
  slice-wise autoencoder's halves fold the slices into the batch inside the trace, so they take volumes too;
- the diffusion UNet and ControlNet do not script (MONAI's attention blocks and ``*args`` forwards) and
  ``ckpt_export`` traces only one-input networks, so ``python -m scripts.export denoiser`` traces the ControlNet
  steering the prior as one graph of ``(latent, timestep, condition)``, saved the same way (metadata and
  configs embedded).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata
from monai.networks.nets import AutoencoderKL
from scripts.autoencoder import SliceAutoencoderKL, slice_wise_target
from scripts.diffusion import ControlledDenoiser
from scripts.enhance import ROOT, inference_parser
from scripts.errors import MissingFileError

EXPORT_CONFIGS = ("configs/inference.json", "configs/inference_diffusion.json", "configs/export.json")


class _AutoencoderPart(torch.nn.Module):
    """Holds the autoencoder's modules under their own names, so ``models/autoencoder.pt`` loads strictly; for a
    ``SliceAutoencoderKL`` a volume's slices go through the 2D half as a batch."""

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        for name, module in autoencoder.named_children():
            self.add_module(name, module)
        self.slice_wise = isinstance(autoencoder, SliceAutoencoderKL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slice_wise and x.ndim == 5:
            return SliceAutoencoderKL.unfold_slices(self.half(SliceAutoencoderKL.fold_slices(x)), x.shape[0])
        return self.half(x)

    def half(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LatentEncoder(_AutoencoderPart):
    """Image -> latent mean (what inference uses)."""

    def half(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv_mu(self.encoder(x))


class LatentDecoder(_AutoencoderPart):
    """Latent -> image."""

    def half(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class ExportedAutoencoder(torch.nn.Module):
    """The exported encoder and decoder behind the interface the windowed encode/decode uses."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        decoder: torch.nn.Module,
        latent_channels: int,
        factor: int,
        slice_wise: bool = False,
    ) -> None:
        super().__init__()
        self.encoder_ts, self.decoder_ts = encoder, decoder
        self.latent_channels, self.downsample, self.slice_wise = latent_channels, factor, slice_wise

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.encoder_ts(x), None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_ts(z)


def load_exported(
    folder: str | Path, latent_channels: int, factor: int, device: str | torch.device = "cpu", slice_wise: bool = False
) -> dict:
    """``networks`` entries for ``scripts.enhance`` from ``encoder.ts``, ``decoder.ts`` and ``denoiser.ts``
    (``slice_wise``: exported from a ``SliceAutoencoderKL``, whose latent keeps every slice)."""
    folder = Path(folder)
    names = ("encoder.ts", "decoder.ts", "denoiser.ts")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise MissingFileError(f"{folder / missing[0]}: no exported network (see docs/README.md, Export)")
    encoder, decoder, denoiser_ts = (torch.jit.load(str(folder / n), map_location=device) for n in names)
    autoencoder = ExportedAutoencoder(encoder, decoder, latent_channels, factor, slice_wise)
    return {"autoencoder": autoencoder, "denoiser": denoiser_ts}


def denoiser(ckpt_dir: str = "models", filepath: str = "models/denoiser.ts", config_file: str | None = None) -> str:
    """Trace the ControlNet-steered prior from ``ckpt_dir`` to ``filepath`` with the metadata and configs inside.

    ``config_file`` adds override files (e.g. ``configs/tiny.json``) after the bundle's configs.
    """
    files = [*EXPORT_CONFIGS, *([config_file] if config_file else [])]
    parser = inference_parser(files, ckpt_dir=str(Path(ckpt_dir).resolve()), device="cpu")
    nets = parser.get_parsed_content("networks")
    net = ControlledDenoiser(nets["diffusion"], nets["controlnet"]).eval()
    latent = parser.get_parsed_content("denoiser_example_shape")
    factor = 2 ** (len(parser["autoencoder_def"]["channels"]) - 1)
    factors = (factor, factor, 1 if slice_wise_target(parser["autoencoder_def"]["_target_"]) else factor)
    condition = (
        torch.randn(1, *latent)
        if parser.get_parsed_content("encode_condition")
        else torch.rand(1, 1, *[s * f for s, f in zip(latent[1:], factors)])
    )
    example = (torch.randn(1, *latent), torch.tensor([500]), condition)
    with torch.no_grad():
        traced = torch.jit.trace(net, example, check_trace=False)
    extra = {Path(f).name: json.dumps(ConfigParser.load_config_file(ROOT / f)).encode() for f in files}
    save_net_with_metadata(
        traced,
        filepath,
        include_config_vals=False,
        append_timestamp=False,
        meta_values=parser.get("_meta_"),
        more_extra_files=extra,
    )
    return filepath


def main() -> None:
    import fire

    fire.Fire({"denoiser": denoiser})


if __name__ == "__main__":
    main()
