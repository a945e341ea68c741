"""The CPU-fast engine: bfloat16 autocast with channels-last tensors, for training and inference on a CPU.

On a CPU with AVX-512 BF16, a 3D conv network runs about 3x faster this way (``make bench``: ``bench engine``).
``--amp true`` means this on a CPU and float16 autocast with gradient scaling on CUDA (MONAI's own AMP). Weights
and optimizer states stay float32; outputs are returned as float32, so losses, metrics and volumes are float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer
from scripts.options import flag


def cpu_bf16(device: torch.device | str, amp: bool | str) -> bool:
    """Whether ``--amp`` means bfloat16 autocast here: asked for, and on a CPU."""
    return flag(amp, "amp") and torch.device(device).type == "cpu"


def autocast(device: torch.device | str, amp: bool | str) -> contextlib.AbstractContextManager:
    """Autocast for ``--amp`` on ``device``: float16 on CUDA, bfloat16 on a CPU, nothing when ``amp`` is false."""
    kind = torch.device(device).type
    if not flag(amp, "amp") or kind not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=torch.float16 if kind == "cuda" else torch.bfloat16)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout (4D or 5D); other tensors unchanged."""
    if x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_network(network: torch.nn.Module, device: torch.device | str, amp: bool | str) -> torch.nn.Module:
    """``network`` on ``device``; for bfloat16 on a CPU also with channels-last weights (float32 still)."""
    network = network.to(device)
    if cpu_bf16(device, amp):
        for p in network.parameters():
            if p.ndim in (4, 5):
                p.data = channels_last(p.data)
    return network


def to_float(out: Any) -> Any:
    """Floating tensors in ``out`` (a tensor, tuple, list or dict) as contiguous float32."""
    if isinstance(out, torch.Tensor):
        return out.float().contiguous() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: to_float(v) for k, v in out.items()}
    return out


def run_network(
    network: Callable, x: torch.Tensor, device: torch.device | str, amp: bool | str, *args: Any, **kwargs: Any
) -> Any:
    """``network(x, ...)`` under ``autocast`` (channels-last input for bfloat16 on a CPU), returned in float32."""
    if cpu_bf16(device, amp):
        x = channels_last(x)
    with autocast(device, amp):
        out = network(x, *args, **kwargs)
    return to_float(out)


class AutocastInferer(Inferer):
    """MONAI inferer for ``SupervisedTrainer``/``SupervisedEvaluator``: bfloat16 + channels-last on a CPU when
    ``amp`` is true. (MONAI's engines autocast on CUDA only; there this inferer only calls the network.)"""

    def __init__(self, amp: bool | str = True) -> None:
        super().__init__()
        self.amp = amp

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
        if not cpu_bf16(inputs.device, self.amp):
            return network(inputs, *args, **kwargs)
        return run_network(network, inputs, inputs.device, self.amp, *args, **kwargs)
