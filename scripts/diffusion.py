"""Stage 2 helpers MONAI lacks: cached-latent loading, an EMA of the weights, deterministic validation batches,
samples from the prior in TensorBoard."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.engines import DiffusionPrepareBatch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import Scheduler
from monai.transforms import MapTransform
from monai.visualize import plot_2d_or_3d_image
from scripts.autoencoder import load_autoencoder_weights
from scripts.options import flag
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)


class LoadLatentd(MapTransform):
    """Load a ``*_latent.pt`` written by ``prepare_latents`` into ``output_key``, multiplied by ``scale_factor``
    (1/std of the latents, so the diffusion model sees unit variance)."""

    def __init__(
        self, keys: KeysCollection, scale_factor: float, output_key: str = "image", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scale_factor, self.output_key = float(scale_factor), output_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            item = torch.load(d[key], map_location="cpu", weights_only=True)
            d[self.output_key] = item["latent"].float() * self.scale_factor
        return d


def ema_model(network: torch.nn.Module, decay: float = 0.999) -> AveragedModel:
    """An exponential moving average of ``network``'s parameters (``torch.optim.swa_utils``)."""
    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class EMAHandler:
    """Update ``ema`` from ``network`` after every iteration."""

    def __init__(self, network: torch.nn.Module, ema: AveragedModel) -> None:
        self.network, self.ema = network, ema

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: self.ema.update_parameters(self.network))


class FixedDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Validation batches with the same noise (seeded) and one fixed timestep every time, so that the
    validation loss compares epochs rather than random draws."""

    def __init__(self, num_train_timesteps: int, timestep: int | None = None, seed: int = 0) -> None:
        super().__init__(num_train_timesteps)
        self.timestep = num_train_timesteps // 2 if timestep is None else timestep
        self.seed = seed

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(images.shape, generator=gen).to(images)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        return torch.full((images.shape[0],), self.timestep, dtype=torch.long, device=images.device)


def controlnet_from_prior(
    controlnet: torch.nn.Module, diffusion: torch.nn.Module, zero_condition_embedding: bool = True
) -> torch.nn.Module:
    """Start the ControlNet from the prior's encoder weights (the ControlNet recipe); its zero-initialised
    output convolutions make it a no-op at first.

    With ``zero_condition_embedding=False`` the last convolution of the conditioning embedding (which MONAI
    also zero-initialises) gets a default random initialisation, so the condition reaches the ControlNet's
    features from the first step instead of only after the output convolutions have grown."""
    controlnet.load_state_dict(diffusion.state_dict(), strict=False)
    if not flag(zero_condition_embedding, "zero_condition_embedding"):
        controlnet.controlnet_cond_embedding.conv_out.conv.reset_parameters()
    return controlnet


class ReseedHandler:
    """Reset a random transform's state when an evaluator starts, so every validation sees the same random
    crops and degradations."""

    def __init__(self, transform, seed: int = 0) -> None:
        self.transform, self.seed = transform, seed

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.transform.set_random_state(self.seed))


def unet_divisor(unet: torch.nn.Module) -> int:
    """What every spatial size of a ``DiffusionModelUNet`` (or ``ControlNet``) input must divide by: 2 per
    downsampling level, so that the skip connections line up."""
    return 2 ** (len(unet.block_out_channels) - 1)


class ControlledDenoiser(torch.nn.Module):
    """The noise prediction of the prior steered by the ControlNet, as one module of ``(latent, timesteps,
    condition)``: what each sampling step calls, and what ``scripts.export`` traces."""

    def __init__(self, diffusion: torch.nn.Module, controlnet: torch.nn.Module) -> None:
        super().__init__()
        self.diffusion, self.controlnet = diffusion, controlnet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        down, mid = self.controlnet(x=x, timesteps=timesteps, controlnet_cond=condition)
        return self.diffusion(
            x=x, timesteps=timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )


class PriorSampleHandler:
    """After each validation, draw one latent patch from the prior under validation (seeded, so epochs compare),
    decode it with the stage-1 autoencoder and log it to TensorBoard as ``prior_sample`` (an animation along z):
    what the prior generates from pure noise, which its noise-prediction error at one timestep does not show.

    The autoencoder's weights are read from ``autoencoder_path`` when the handler is attached; without them it
    logs a warning and is not attached."""

    def __init__(
        self,
        diffusion: torch.nn.Module,
        autoencoder_def: torch.nn.Module,
        autoencoder_path: str,
        scheduler: Scheduler,
        scale_factor: float,
        latent_shape: Sequence[int],
        log_dir: str,
        num_inference_steps: int = 25,
        seed: int = 0,
    ) -> None:
        self.diffusion, self.autoencoder, self.autoencoder_path = diffusion, autoencoder_def, autoencoder_path
        scheduler.set_timesteps(num_inference_steps)
        self.inferer = LatentDiffusionInferer(scheduler, scale_factor=float(scale_factor))
        self.latent_shape, self.log_dir, self.seed = list(latent_shape), log_dir, seed

    def attach(self, engine: Engine) -> None:
        if not Path(self.autoencoder_path).is_file():
            logger.warning("%s not found: no prior samples in TensorBoard", self.autoencoder_path)
            return
        load_autoencoder_weights(self.autoencoder, self.autoencoder_path)
        self.writer = SummaryWriter(log_dir=self.log_dir)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.autoencoder.to(engine.state.device).eval()
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((1, self.diffusion.in_channels, *self.latent_shape), generator=gen)
        was_training = self.diffusion.training
        self.diffusion.eval()
        image = self.inferer.sample(noise.to(engine.state.device), self.autoencoder, self.diffusion, verbose=False)
        self.diffusion.train(was_training)
        plot_2d_or_3d_image(
            image.float().cpu(), step=engine.state.epoch, writer=self.writer, frame_dim=-1, tag="prior_sample"
        )
        self.writer.flush()
