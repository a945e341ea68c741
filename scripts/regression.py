"""The regression stage as a 2.5D network: a plain residual 2D CNN over the two planes that hold the slice axis.

A 3D residual UNet trained here for 77 minutes stayed at its identity start (docs, "Release run 0.12.0"): full 3D
convolutions are too slow on two CPU cores to see enough data. ``PlaneResidualNet`` runs one 2D CNN (VDSR-style:
3x3 convolutions and ReLUs, no normalisation, a global residual) on x-z planes and on y-z planes, with ``context``
neighbouring planes as extra input channels, and averages the two residuals. Every plane holds the slice axis
(thick slices, through-plane blur) and one in-plane axis; the neighbours give it the other in-plane axis locally
(k-space ringing, blur, noise). Training feeds it planes cut from the 3D training pairs (``plane_pairs``), which costs
a tenth of a 3D step per supervised voxel; a volume goes through ``forward`` as a whole.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["PlaneResidualNet", "plane_pairs", "prepare_batch"]


class PlaneResidualNet(nn.Module):
    """``x + mean(residual over x-z planes, residual over y-z planes)`` for a ``(B, 1, X, Y, Z)`` volume, or
    ``centre + residual`` for a ``(N, 2 * context + 1, H, Z)`` batch of planes with their neighbours (training).

    Args:
        channels: width of every hidden layer.
        layers: number of 3x3 convolutions (receptive field ``2 * layers + 1`` pixels).
        context: neighbouring planes on each side given as extra channels (edges are replicated).
        chunk: planes per forward pass when a volume is processed (bounds the memory of inference).
    """

    def __init__(self, channels: int = 48, layers: int = 12, context: int = 2, chunk: int = 64) -> None:
        super().__init__()
        self.context, self.chunk = context, chunk
        body: list[nn.Module] = [nn.Conv2d(2 * context + 1, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(layers - 2):
            body += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        body.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.body = nn.Sequential(*body)
        for conv in body[:-1:2]:  # He initialisation: PyTorch's default shrinks a plain ReLU stack layer by layer
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return x[:, self.context : self.context + 1] + self.body(x)
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"PlaneResidualNet takes (B, 1, X, Y, Z) volumes or (N, C, H, Z) planes, got {x.shape}")
        return x + 0.5 * (self._residual(x, 3) + self._residual(x, 2))

    def _residual(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """The body's residual for every plane across ``axis`` (3: x-z planes, 2: y-z planes), as a volume."""
        c = self.context
        padded = pad_across(x[:, 0], axis, c)  # (B, X', Y', Z)
        stack = padded.unfold(axis - 1, 2 * c + 1, 1)  # (B, ..., Z, 2c+1) with planes along axis - 1
        stack = stack.movedim(axis - 1, 1).movedim(-1, 2)  # (B, n, 2c+1, H, Z)
        b, n, h, z = stack.shape[0], stack.shape[1], stack.shape[3], stack.shape[4]
        planes = stack.reshape(b * n, 2 * c + 1, h, z)
        weight = self.body[0].weight
        last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        chunks = []
        for i in range(0, b * n, self.chunk):
            chunk = planes[i : i + self.chunk]
            chunks.append(self.body(chunk.contiguous(memory_format=torch.channels_last) if last else chunk))
        out = torch.cat(chunks)  # (B * n, 1, H, Z)
        return out.reshape(b, n, h, z).movedim(1, axis - 1).unsqueeze(1)


def pad_across(volumes: torch.Tensor, axis: int, context: int) -> torch.Tensor:
    """``(B, X, Y, Z)`` volumes with ``context`` edge-replicated planes added on both sides across ``axis`` of the
    ``(B, 1, X, Y, Z)`` layout (2: x, 3: y), so that every plane has its neighbours."""
    pad = [0, 0, context, context, 0, 0] if axis == 3 else [0, 0, 0, 0, context, context]
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


def prepare_batch(planes_per_axis: int | None, context: int) -> Callable:
    """``SupervisedTrainer``'s ``prepare_batch`` for ``(condition, image)`` pairs: planes cut by ``plane_pairs``
    (``planes_per_axis`` per axis and volume), or the whole 3D crops when ``planes_per_axis`` is None (a 3D
    network such as ``configs/regression_unet3d.json``)."""

    def prepare(batch: dict, device: torch.device, non_blocking: bool = False, **kwargs: Any) -> tuple:
        condition = batch["condition"].to(device, non_blocking=non_blocking)
        image = batch["image"].to(device, non_blocking=non_blocking)
        if planes_per_axis is None:
            return condition, image
        return plane_pairs(condition, image, planes_per_axis, context)

    return prepare
