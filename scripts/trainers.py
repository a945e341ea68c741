"""Trainers MONAI has no class for: the autoencoder's VAE-GAN steps and the ControlNet on a frozen prior.

MONAI's ``AdversarialTrainer`` has no KL term, adversarial warm-up or gradient accumulation, which a latent
diffusion autoencoder needs; its ``SupervisedTrainer`` runs one network, while stage 3 needs a frozen
autoencoder, a frozen prior and the ControlNet in one step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines import Evaluator, IterationEvents, Trainer
from monai.engines.utils import default_prepare_batch
from monai.inferers import ControlNetDiffusionInferer
from monai.losses import PatchAdversarialLoss
from monai.networks.schedulers import Scheduler
from monai.utils import CommonKeys as Keys
from monai.visualize import plot_2d_or_3d_image
from scripts.autoencoder import downsample_factors
from scripts.diffusion import ControlledDenoiser, unet_divisor
from scripts.engine import autocast, channels_last, cpu_bf16, run_network
from scripts.enhance import sample_latent
from scripts.options import flag
from torch.optim import Optimizer
from torch.utils.tensorboard import SummaryWriter


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def identity_start(network: torch.nn.Module, scale: float = 0.0) -> torch.nn.Module:
    """Scale the last convolution of a residual network (``SkipConnection`` around a UNet, ``PlaneResidualNet``)
    by ``scale``, so that it starts as (nearly) the identity: training begins at the interpolated input's loss
    instead of first unlearning a random residual (in the 0.12.0 release run the randomly initialised peer spent
    its first epochs getting back to the input). ``scale=0`` is the exact identity, a saddle: the other layers get
    no gradient until the last one has grown, and on MR Rician noise the plane network sat at its input's loss
    for hundreds of iterations (docs, "Release run 0.15.0"); a small ``scale`` (0.1) breaks it."""
    heads = [network.body, network.axial_body] if getattr(network, "axial_body", None) is not None else [network]
    for head in heads:  # a three-view PlaneResidualNet: the last convolution of each of its two CNNs
        last = [m for m in head.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))][-1]
        with torch.no_grad():
            last.weight.mul_(scale)
            if last.bias is not None:
                last.bias.zero_()
    return network


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of N(mu, sigma^2) from N(0, 1), summed over latent voxels, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-8) - 1)
    return kl.sum(dim=tuple(range(1, kl.ndim))).mean()


class VAEGANTrainer(Trainer):
    """Trains an ``AutoencoderKL`` with L1 + KL (+ optional extra losses) and, after ``adv_warmup_iters``
    iterations, a patch-discriminator adversarial loss.

    ``extra_losses`` maps a name to ``(weight, loss_fn(recon, image))`` (SSIM, spectral or perceptual losses);
    each value is reported in the engine output under its name. Gradients are accumulated over
    ``accumulation_steps`` iterations. ``amp=True`` is float16 AMP on CUDA and bfloat16 autocast with
    channels-last tensors on a CPU (``scripts.engine``).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: Optimizer,
        discriminator: torch.nn.Module,
        d_optimizer: Optimizer,
        kl_weight: float = 1e-7,
        adv_weight: float = 0.01,
        adv_warmup_iters: int = 1000,
        extra_losses: dict[str, tuple[float, Callable]] | None = None,
        accumulation_steps: int = 1,
        epoch_length: int | None = None,
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        non_blocking: bool = False,
    ) -> None:
        bf16 = cpu_bf16(device, amp)
        amp = flag(amp, "amp") and torch.device(device).type == "cuda"
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=train_handlers,
            amp=amp,
        )
        self.network, self.optimizer, self.bf16 = network, optimizer, bf16
        self.discriminator, self.d_optimizer = discriminator, d_optimizer
        self.kl_weight, self.adv_weight, self.adv_warmup_iters = kl_weight, adv_weight, adv_warmup_iters
        self.extra_losses = extra_losses or {}
        self.accumulation_steps = max(1, int(accumulation_steps))
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.scaler = torch.amp.GradScaler("cuda") if amp else None
        self.d_scaler = torch.amp.GradScaler("cuda") if amp else None

    def _step(
        self,
        loss: torch.Tensor,
        optimizer: Optimizer,
        scaler: torch.amp.GradScaler | None,
        last: bool,
        module: torch.nn.Module,
    ) -> None:
        """Backward into ``module``'s parameters only (the generator loss must not touch the discriminator),
        stepping every ``accumulation_steps`` iterations."""
        loss = loss / self.accumulation_steps
        (scaler.scale(loss) if scaler else loss).backward(inputs=[p for p in module.parameters() if p.requires_grad])
        if last:
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def _iteration(self, engine: VAEGANTrainer, batchdata: dict) -> dict:  # type: ignore[override]
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        images = channels_last(batch[0]) if self.bf16 else batch[0]
        last = engine.state.iteration % self.accumulation_steps == 0
        adversarial = engine.state.iteration > self.adv_warmup_iters and self.adv_weight > 0
        self.network.train()
        fast = self.amp or self.bf16
        with autocast(engine.state.device, fast):
            recon, z_mu, z_sigma = self.network(images)
            out = {
                "l1": torch.nn.functional.l1_loss(recon.float(), images.float()),
                "kl": kl_loss(z_mu.float(), z_sigma.float()),
            }
            loss = out["l1"] + self.kl_weight * out["kl"]
            for name, (weight, fn) in self.extra_losses.items():
                out[name] = fn(recon.float(), images.float())
                loss = loss + weight * out[name]
            if adversarial:
                # the plain module: under DDP, the wrapped discriminator would wait for gradients it never gets
                logits = _unwrap(self.discriminator)(recon.contiguous().float())[-1]
                out["adv_g"] = self.adv_loss(logits, target_is_real=True, for_discriminator=False)
                loss = loss + self.adv_weight * out["adv_g"]
        self._step(loss, self.optimizer, self.scaler, last, self.network)

        if adversarial:
            self.discriminator.train()
            with autocast(engine.state.device, fast):
                fake = self.discriminator(recon.detach().contiguous().float())[-1]
                real = self.discriminator(images.contiguous().float())[-1]
                out["adv_d"] = 0.5 * (
                    self.adv_loss(fake, target_is_real=False, for_discriminator=True)
                    + self.adv_loss(real, target_is_real=True, for_discriminator=True)
                )
            self._step(self.adv_weight * out["adv_d"], self.d_optimizer, self.d_scaler, last, self.discriminator)

        engine.state.output = {
            Keys.IMAGE: images,
            Keys.PRED: recon.detach(),
            Keys.LOSS: loss.detach(),
            **{k: v.detach() for k, v in out.items()},
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # decollates the output, as MONAI's trainers do
        return engine.state.output


def optional_losses(
    ssim_weight: float = 0.0,
    spectral_weight: float = 0.0,
    perceptual_weight: float = 0.0,
    perceptual_weights_path: str | None = None,
    spatial_dims: int = 3,
) -> dict[str, tuple[float, Callable]]:
    """The extra reconstruction losses switched on by a positive weight.

    The perceptual loss uses a torchvision ResNet-50 on 2.5D slices and needs its weights as a local file
    (``perceptual_weights_path``): nothing is downloaded.
    """
    from monai.losses import JukeboxLoss, PerceptualLoss, SSIMLoss

    losses: dict[str, tuple[float, Callable]] = {}
    if ssim_weight > 0:
        losses["ssim"] = (ssim_weight, SSIMLoss(spatial_dims=spatial_dims, data_range=1.0))
    if spectral_weight > 0:
        losses["spectral"] = (spectral_weight, JukeboxLoss(spatial_dims=spatial_dims))
    if perceptual_weight > 0:
        if not perceptual_weights_path:
            raise ValueError(
                "perceptual_weight > 0 needs perceptual_weights_path: a local ResNet-50 state dict "
                "(hub downloads are not used)"
            )
        loss = PerceptualLoss(
            spatial_dims=spatial_dims,
            network_type="resnet50",
            is_fake_3d=True,
            pretrained=True,
            pretrained_path=perceptual_weights_path,
        )
        losses["perceptual"] = (perceptual_weight, loss)
    return losses


def loss_terms(output: list[dict] | dict) -> dict[str, float]:
    """Every loss term of a ``VAEGANTrainer`` output (decollated: the first item holds the batch's values)."""
    first = output[0] if isinstance(output, list) else output
    skip = {Keys.IMAGE, Keys.PRED, Keys.LABEL}
    return {k: float(v) for k, v in first.items() if k not in skip}


class ControlNetTrainer(Trainer):
    """Trains a ControlNet on a frozen latent prior: the clean patch is encoded by the frozen autoencoder (times
    the latent scale factor), noised, and the prior, steered by the ControlNet from the degraded patch
    (``condition_key``, on the clean patch's grid), predicts the noise (MSE)."""

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        controlnet: torch.nn.Module,
        optimizer: Optimizer,
        diffusion: torch.nn.Module,
        autoencoder: torch.nn.Module,
        scheduler: Scheduler,
        scale_factor: float,
        condition_key: str = "condition",
        encode_condition: bool = False,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        non_blocking: bool = False,
        stage_a: torch.nn.Module | None = None,
    ) -> None:
        amp = flag(amp, "amp") and torch.device(device).type == "cuda"
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            handlers=train_handlers,
            amp=amp,
        )
        self.controlnet, self.optimizer = controlnet, optimizer
        self.diffusion, self.autoencoder = diffusion.eval().requires_grad_(False), autoencoder.eval().requires_grad_(
            False
        )
        self.scheduler, self.scale_factor, self.condition_key = scheduler, float(scale_factor), condition_key
        self.encode_condition = encode_condition
        self.stage_a = stage_a.requires_grad_(False) if stage_a is not None else None
        self.inferer = ControlNetDiffusionInferer(scheduler)
        self.scaler = torch.amp.GradScaler("cuda") if amp else None

    def _iteration(self, engine: ControlNetTrainer, batchdata: dict) -> dict:  # type: ignore[override]
        images, noise, timesteps, latents, condition = controlnet_inputs(
            batchdata,
            engine.state.device,
            self.autoencoder,
            self.scheduler,
            self.scale_factor,
            self.condition_key,
            self.amp,
            encode_condition=self.encode_condition,
            stage_a=self.stage_a,
        )
        self.controlnet.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=self.amp):
            pred = self.inferer(latents, self.diffusion, self.controlnet, noise, timesteps, cn_cond=condition)
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        engine.state.output = {Keys.IMAGE: images, Keys.PRED: pred.detach(), Keys.LOSS: loss.detach()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


@torch.no_grad()
def controlnet_inputs(
    batchdata: dict,
    device: torch.device,
    autoencoder: torch.nn.Module,
    scheduler: Scheduler,
    scale_factor: float,
    condition_key: str = "condition",
    amp: bool = False,
    generator: torch.Generator | None = None,
    timestep: int | None = None,
    encode_condition: bool = False,
    stage_a: torch.nn.Module | None = None,
) -> tuple:
    """Clean images, noise, timesteps, scaled latents and condition for one ControlNet step; with ``generator``
    and ``timestep`` the draw is fixed (validation). With ``stage_a`` (the frozen regression network, two-stage
    training) the condition is its output on the degraded patch: pairs of (regression output, reference)."""
    images = batchdata["image"].to(device)
    condition = batchdata[condition_key].to(device)
    if stage_a is not None:
        condition = run_network(stage_a.eval(), condition, device, True)
    with torch.autocast("cuda", enabled=amp):
        latents = autoencoder.encode(images)[0].float() * scale_factor
        if encode_condition:
            condition = autoencoder.encode(condition)[0].float() * scale_factor
    noise = torch.randn(latents.shape, generator=generator).to(latents) if generator else torch.randn_like(latents)
    if timestep is None:
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (latents.shape[0],), device=device)
    else:
        timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=device)
    return images, noise, timesteps, latents, condition


class ControlNetEvaluator(Evaluator):
    """Validation of the ControlNet: noise-prediction error on validation pairs with fixed noise (seeded per
    run) and a fixed timestep, so epochs are comparable. Outputs ``pred`` and ``label`` (the noise), and
    ``pred_blind``: the prediction with an all-zero condition. A ControlNet that steers predicts worse without
    its condition; one whose two errors match has only learnt to adjust the prior (an early phase of training).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        controlnet: torch.nn.Module,
        diffusion: torch.nn.Module,
        autoencoder: torch.nn.Module,
        scheduler: Scheduler,
        scale_factor: float,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        val_handlers: Sequence | None = None,
        condition_key: str = "condition",
        encode_condition: bool = False,
        timestep: int | None = None,
        seed: int = 0,
        stage_a: torch.nn.Module | None = None,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=lambda current, best: current < best,
            val_handlers=val_handlers,
        )
        self.controlnet, self.diffusion, self.autoencoder = controlnet, diffusion, autoencoder
        self.scheduler, self.scale_factor, self.condition_key = scheduler, float(scale_factor), condition_key
        self.timestep = scheduler.num_train_timesteps // 2 if timestep is None else timestep
        self.seed, self.encode_condition, self.stage_a = seed, encode_condition, stage_a
        self.inferer = ControlNetDiffusionInferer(scheduler)

    def _iteration(self, engine: ControlNetEvaluator, batchdata: dict) -> dict:  # type: ignore[override]
        gen = torch.Generator().manual_seed(self.seed + engine.state.iteration)
        images, noise, timesteps, latents, condition = controlnet_inputs(
            batchdata,
            engine.state.device,
            self.autoencoder,
            self.scheduler,
            self.scale_factor,
            self.condition_key,
            generator=gen,
            timestep=self.timestep,
            encode_condition=self.encode_condition,
            stage_a=self.stage_a,
        )
        self.controlnet.eval()
        with torch.no_grad():
            pred = self.inferer(latents, self.diffusion, self.controlnet, noise, timesteps, cn_cond=condition)
            blind = self.inferer(
                latents, self.diffusion, self.controlnet, noise, timesteps, cn_cond=torch.zeros_like(condition)
            )
        engine.state.output = {
            Keys.IMAGE: images,
            Keys.PRED: pred.float(),
            Keys.LABEL: noise,
            "pred_blind": blind.float(),
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class RestorationSampleHandler:
    """After each validation, restore the degraded patch of the last validation pair (the same pair every time:
    the validation pipeline is reseeded) from pure noise with the ControlNet on the prior (DDIM, seeded), and log
    ``restoration_condition``, ``restoration_sample`` and ``restoration_target`` to TensorBoard (animations along
    z): what the ControlNet makes of its condition, which its noise error does not show."""

    def __init__(
        self,
        controlnet: torch.nn.Module,
        diffusion: torch.nn.Module,
        autoencoder: torch.nn.Module,
        scheduler: Scheduler,
        scale_factor: float,
        log_dir: str,
        encode_condition: bool = False,
        num_inference_steps: int = 20,
        condition_key: str = "condition",
        seed: int = 0,
        stage_a: torch.nn.Module | None = None,
    ) -> None:
        self.denoiser, self.stage_a = ControlledDenoiser(diffusion, controlnet), stage_a
        self.autoencoder, self.scheduler, self.scale_factor = autoencoder, scheduler, float(scale_factor)
        self.encode_condition, self.num_inference_steps = encode_condition, num_inference_steps
        self.condition_key, self.seed, self.log_dir = condition_key, seed, log_dir
        self.writer: SummaryWriter | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        item = batch[-1] if isinstance(batch, list) else {k: v[-1] for k, v in batch.items()}
        device = engine.state.device
        target, condition = item["image"][None].to(device), item[self.condition_key][None].to(device)
        if self.stage_a is not None:
            condition = run_network(self.stage_a.eval(), condition, device, True)
        fold = downsample_factors(self.autoencoder)
        if self.encode_condition:
            condition_in, fold = self.autoencoder.encode(condition)[0] * self.scale_factor, (1, 1, 1)
        else:
            condition_in = condition
        latent_shape = [s // f for s, f in zip(condition_in.shape[2:], fold)]
        z = sample_latent(
            self.denoiser,
            self.scheduler,
            condition_in,
            self.autoencoder.latent_channels,
            fold,
            self.num_inference_steps,
            torch.Generator().manual_seed(self.seed),
            latent_shape,
            progress=False,
            unit=unet_divisor(self.denoiser.diffusion),
        )
        restored = self.autoencoder.decode(z / self.scale_factor)
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        for tag, image in (("condition", condition), ("sample", restored), ("target", target)):
            plot_2d_or_3d_image(
                image.float().cpu(), step=engine.state.epoch, writer=self.writer, frame_dim=-1, tag=f"restoration_{tag}"
            )
        self.writer.flush()
