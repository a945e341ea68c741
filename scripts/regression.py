"""The regression stage as a 2.5D network: a plain residual 2D CNN over the planes of a volume.

A 3D residual UNet trained here for 77 minutes stayed at its identity start (docs, "Release run 0.12.0"): full 3D
convolutions are too slow on two CPU cores to see enough data. ``PlaneResidualNet`` runs one 2D CNN (VDSR-style:
3x3 convolutions and ReLUs, no normalisation, a global residual) on x-z planes and on y-z planes, with ``context``
neighbouring planes as extra input channels, and averages the two residuals. Every plane holds the slice axis
(thick slices, through-plane blur) and one in-plane axis; the neighbours give it the other in-plane axis locally
(k-space ringing, blur, noise). With ``axial=True`` a second CNN of the same shape does the same on x-y planes,
with neighbouring slices as channels, and the three residuals are averaged: the denoisers' setting, where the
in-plane grid is the finest and low-dose CT noise is correlated within a slice (its streaks). Training feeds it
planes cut from the 3D training pairs (``plane_pairs``), which costs a tenth of a 3D step per supervised voxel; a
volume goes through ``forward`` as a whole. With ``widths`` each CNN is a small 2D U-Net (``PlaneUNet``) instead:
the MR denoiser's, which gained a little from seeing more of a plane than the plain stack's 25 pixels.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["PlaneResidualNet", "PlaneUNet", "axial_windows", "plane_pairs", "prepare_batch"]


class _PlainCNN(nn.Sequential):
    """The plain stack; ``first_weight`` tells ``PlaneResidualNet`` the weights' memory format, as ``PlaneUNet``'s does."""

    def first_weight(self) -> torch.Tensor:
        return self[0].weight


def _plain_cnn(in_channels: int, channels: int, layers: int) -> nn.Sequential:
    """``layers`` 3x3 convolutions with ReLUs between them, He-initialised, one output channel."""
    body: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
    for _ in range(layers - 2):
        body += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
    body.append(nn.Conv2d(channels, 1, 3, padding=1))
    for conv in body[:-1:2]:  # He initialisation: PyTorch's default shrinks a plain ReLU stack layer by layer
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
    return _PlainCNN(*body)


class PlaneUNet(nn.Module):
    """A 2D U-Net with one output channel and no normalisation: two 3x3 convolutions with ReLUs per level, average
    pooling down, bilinear upsampling and concatenated skips up, He-initialised. Its receptive field grows with
    each level at a quarter of the cost per pixel, where the plain stack's grows by 2 pixels per layer. Any plane
    size: planes are edge-padded to a multiple of ``2 ** (len(widths) - 1)`` and cropped back."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        ins = [in_channels, *widths[:-1]]
        self.down = nn.ModuleList(_conv_pair(i, o) for i, o in zip(ins, widths))
        deepest_first = reversed(range(len(widths) - 1))
        self.up = nn.ModuleList(_conv_pair(widths[i] + widths[i + 1], widths[i]) for i in deepest_first)
        self.head = nn.Conv2d(widths[0], 1, 3, padding=1)
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        self.multiple = 2 ** (len(widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        x = nn.functional.pad(x, (0, -w % self.multiple, 0, -h % self.multiple), mode="replicate")
        skips: list[torch.Tensor] = []
        for level, down in enumerate(self.down):
            x = down(x if level == 0 else nn.functional.avg_pool2d(x, 2))
            skips.append(x)
        for i, up in enumerate(self.up):
            skip = skips[len(skips) - 2 - i]
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], 1))
        return self.head(x)[..., :h, :w]

    def first_weight(self) -> torch.Tensor:
        return self.down[0][0].weight


def _conv_pair(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(inplace=True),
    )


class PlaneResidualNet(nn.Module):
    """``x + mean(residual over x-z planes, residual over y-z planes[, residual over x-y planes])`` for a
    ``(B, 1, X, Y, Z)`` volume, or ``centre + residual`` for a ``(N, 2 * context + 1, H, W)`` batch of planes with
    their neighbours (training), of which the last ``axial`` are x-y planes for the axial CNN.

    Args:
        channels: width of every hidden layer.
        layers: number of 3x3 convolutions (receptive field ``2 * layers + 1`` pixels).
        context: neighbouring planes on each side given as extra channels (edges are replicated).
        chunk: planes per forward pass when a volume is processed (bounds the memory of inference).
        axial: add the x-y plane CNN (``axial_body``). Weights without it (a two-view network's) load into it
            with ``axial_body`` a copy of ``body``: the warm start of a three-view network.
        widths: when given, each CNN is a ``PlaneUNet`` with these widths per level instead of the plain stack
            (``channels`` and ``layers`` are then unused): the MR denoiser's, 0.1-0.2 dB over the plain stack on
            the held-out MRs (docs, "Release run 0.19.0").
    """

    def __init__(
        self,
        channels: int = 48,
        layers: int = 12,
        context: int = 2,
        chunk: int = 64,
        axial: bool = False,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.context, self.chunk = context, chunk

        def cnn() -> nn.Module:
            if widths:
                return PlaneUNet(2 * context + 1, widths)
            return _plain_cnn(2 * context + 1, channels, layers)

        self.body = cnn()
        self.axial_body = cnn() if axial else None
        if axial:
            self.register_load_state_dict_pre_hook(_axial_from_body)

    def forward(self, x: torch.Tensor, axial: int = 0) -> torch.Tensor:
        if x.ndim == 4:
            centre = x[:, self.context : self.context + 1]
            if not axial:
                return centre + self.body(x)
            if self.axial_body is not None:
                n = x.shape[0] - axial
                return centre + torch.cat([self.body(x[:n]), self.axial_body(x[n:])])
            raise ValueError("axial planes given to a PlaneResidualNet without axial=True")
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"PlaneResidualNet takes (B, 1, X, Y, Z) volumes or (N, C, H, W) planes, got {x.shape}")
        through = self._residual(x, 3) + self._residual(x, 2)
        if self.axial_body is not None:
            return x + (through + self._residual(x, 4)) / 3
        return x + 0.5 * through

    def _residual(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """The residual for every plane across ``axis`` (3: x-z planes, 2: y-z planes, 4: x-y planes by the
        axial CNN), as a volume."""
        c = self.context
        padded = pad_across(x[:, 0], axis, c)  # (B, X', Y', Z')
        stack = padded.unfold(axis - 1, 2 * c + 1, 1)  # (B, ..., 2c+1) with planes along axis - 1
        stack = stack.movedim(axis - 1, 1).movedim(-1, 2)  # (B, n, 2c+1, H, W)
        b, n, h, w = stack.shape[0], stack.shape[1], stack.shape[3], stack.shape[4]
        planes = stack.reshape(b * n, 2 * c + 1, h, w)
        weight = self.body.first_weight()  # both CNNs are prepared alike (scripts.engine.prepare_network)
        last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        chunks = []
        for i in range(0, b * n, self.chunk):
            chunk = planes[i : i + self.chunk]
            if last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            if axis == 4 and self.axial_body is not None:
                chunks.append(self.axial_body(chunk))
            else:
                chunks.append(self.body(chunk))
        out = torch.cat(chunks)  # (B * n, 1, H, W)
        return out.reshape(b, n, h, w).movedim(1, axis - 1).unsqueeze(1)


def _axial_from_body(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load hook: a state dict without ``axial_body`` (a two-view network's) starts the axial CNN as ``body``."""
    body, axial = prefix + "body.", prefix + "axial_body."
    if not any(k.startswith(axial) for k in state_dict):
        for k in [k for k in state_dict if k.startswith(body)]:
            state_dict[axial + k[len(body) :]] = state_dict[k].clone()


def pad_across(volumes: torch.Tensor, axis: int, context: int) -> torch.Tensor:
    """``(B, X, Y, Z)`` volumes with ``context`` edge-replicated planes added on both sides across ``axis`` of the
    ``(B, 1, X, Y, Z)`` layout (2: x, 3: y, 4: z), so that every plane has its neighbours."""
    pad = [0] * 6
    pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = context
    return nn.functional.pad(volumes, pad, mode="replicate")


def plane_pairs(
    condition: torch.Tensor, image: torch.Tensor, per_axis: int, context: int, axes: Sequence[int] = (2, 3)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``per_axis`` random planes across each of ``axes`` (2: y-z planes, 3: x-z planes) from every volume of a
    ``(B, 1, X, Y, Z)`` pair: the condition with ``context`` neighbours each side as channels, the image's centre
    plane as target. Square in-plane crops give planes of one shape for both axes."""
    cond, target = [], []
    for axis in axes:
        c = pad_across(condition[:, 0], axis, context)
        n = image.shape[axis]
        for b in range(image.shape[0]):
            for k in torch.randint(0, n, (per_axis,)).tolist():
                cond.append(c[b].narrow(axis - 2, k, 2 * context + 1).movedim(axis - 2, 0))
                target.append(image[b].select(axis - 1, k))
    return torch.stack(cond), torch.stack(target)


def axial_windows(
    condition: torch.Tensor, image: torch.Tensor, per_volume: int, context: int, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``per_volume`` random x-y planes from every volume of a ``(B, 1, X, Y, Z)`` pair, with ``context``
    neighbouring slices each side as channels, each cropped to a random ``size`` window (transposed at random, as
    the in-plane grid is square), so that they stack with the x-z and y-z planes of ``plane_pairs``."""
    cond, target = [], []
    c = pad_across(condition[:, 0], 4, context)
    for b in range(image.shape[0]):
        for k in torch.randint(0, image.shape[-1], (per_volume,)).tolist():
            pair = torch.cat([c[b].narrow(2, k, 2 * context + 1).movedim(2, 0), image[b, :, :, :, k]])
            if torch.rand(()) < 0.5:
                pair = pair.transpose(1, 2)
            h, w = min(size[0], pair.shape[1]), min(size[1], pair.shape[2])
            i = int(torch.randint(0, pair.shape[1] - h + 1, ()))
            j = int(torch.randint(0, pair.shape[2] - w + 1, ()))
            window = pair[:, i : i + h, j : j + w]
            cond.append(window[:-1])
            target.append(window[-1:])
    return torch.stack(cond), torch.stack(target)


def prepare_batch(planes_per_axis: int | None, network: nn.Module) -> Callable:
    """``SupervisedTrainer``'s ``prepare_batch`` for ``(condition, image)`` pairs: planes cut by ``plane_pairs``
    (``planes_per_axis`` per axis and volume), followed for a three-view ``network`` by as many x-y windows per
    volume (``axial_windows``, passed on as ``axial=N``); or the whole 3D crops when ``planes_per_axis`` is None
    (a 3D network such as ``configs/regression_unet3d.json``)."""
    context = getattr(network, "context", 0)
    axial = planes_per_axis if getattr(network, "axial_body", None) is not None else 0

    def prepare(batch: dict, device: torch.device, non_blocking: bool = False, **kwargs: Any) -> tuple:
        condition = batch["condition"].to(device, non_blocking=non_blocking)
        image = batch["image"].to(device, non_blocking=non_blocking)
        if planes_per_axis is None:
            return condition, image
        planes, target = plane_pairs(condition, image, planes_per_axis, context)
        if not axial:
            return planes, target
        windows, window_target = axial_windows(condition, image, axial, context, planes.shape[-2:])
        return torch.cat([planes, windows]), torch.cat([target, window_target]), (), {"axial": len(windows)}

    return prepare
