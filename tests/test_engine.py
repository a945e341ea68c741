"""The CPU-fast engine: bfloat16 autocast with channels-last tensors gives float32 outputs close to float32's."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from scripts.engine import AutocastInferer, autocast, channels_last, cpu_bf16, prepare_network, run_network
from scripts.intensity import denormalize, intensity_params, normalize
from scripts.volumes import load_volume
from tests.conftest import ROOT, SAMPLE

# bfloat16 keeps 8 bits of mantissa: the residual peer's correction carries errors of about 1 % of itself, and
# the input it adds to passes in float32. Stated tolerance for the main job's output (docs/README.md, CPU engine):
# mean absolute difference to float32 under 1 HU, 99th percentile under 15 HU (a few high-contrast voxels differ
# by more).
BF16_MEAN_HU, BF16_P99_HU = 1.0, 15.0


def test_options():
    assert cpu_bf16("cpu", "true") and not cpu_bf16("cpu", False) and not cpu_bf16("cuda", True)
    with autocast("cpu", True):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast("cpu", "false"):
        assert not torch.is_autocast_enabled("cpu")
    assert channels_last(torch.zeros(1, 2, 3, 4, 5)).is_contiguous(memory_format=torch.channels_last_3d)


def test_weights_stay_float32_and_outputs_are_float32():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Conv3d(4, 1, 3, padding=1))
    net = prepare_network(net, "cpu", True)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    out = AutocastInferer(True)(torch.randn(1, 1, 8, 8, 8), net)
    assert out.dtype == torch.float32
    out.mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


def _peer() -> torch.nn.Module:
    torch.manual_seed(0)
    net = ConfigParser.load_config_file(ROOT / "configs" / "inference.json")["regression_def"]
    peer = ConfigParser({"net": net}).get_parsed_content("net").eval()
    weights = ROOT / "models" / "model.pt"
    if weights.is_file():
        peer.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:  # untrained: scale the last layer so that the correction is tens of HU, as a trained one's
        last = [m for m in peer.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        with torch.no_grad():
            last.weight.mul_(0.05)
    return peer


@pytest.mark.skipif(not SAMPLE.is_file(), reason="the demo sample is not in the repository")
def test_bf16_inference_matches_float32_in_hu_on_a_real_crop():
    img = load_volume(SAMPLE)
    hu = img.as_tensor()[None].float()
    params = intensity_params(hu, "ct")
    x = normalize(hu, params)
    peer = _peer()
    with torch.no_grad():
        ref = denormalize(peer(x), params)
        fast = denormalize(run_network(prepare_network(peer, "cpu", True), x, "cpu", True), params)
    assert fast.dtype == torch.float32
    err = (fast - ref).abs()
    assert float((ref - hu).abs().mean()) > 1.0  # the network does change the input
    p99 = float(err.flatten().kthvalue(int(0.99 * err.numel())).values)
    assert float(err.mean()) < BF16_MEAN_HU and p99 < BF16_P99_HU, (float(err.mean()), p99)
