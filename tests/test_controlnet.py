"""Stage 3: the ControlNet trained on degraded/clean pairs made on the fly, on a frozen prior."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from tests.conftest import ROOT, mlflow_record, torchrun, tracking

CONFIGS = ["configs/train_controlnet.json", "configs/tiny.json"]


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> Path:
    """Tiny autoencoder and prior weights with a scale factor, as stages 1 and 2 leave them."""
    ckpt = tmp_path_factory.mktemp("frozen")
    tiny = ConfigParser(json.loads((ROOT / "configs" / "tiny.json").read_text()))
    torch.manual_seed(0)
    torch.save(tiny.get_parsed_content("autoencoder_def").state_dict(), ckpt / "autoencoder.pt")
    torch.save(tiny.get_parsed_content("diffusion_def").state_dict(), ckpt / "diffusion.pt")
    (ckpt / "autoencoder_scale.json").write_text(json.dumps({"scale_factor": 1.3}))
    return ckpt


def parse(crops: Path, ckpt: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in CONFIGS])
    parser.update(
        {
            "bundle_root": str(ROOT),
            "datalist": str(crops / "datalist.json"),
            "ckpt_dir": str(ckpt),
            "output_dir": str(ckpt / "tb"),
            **overrides,
        }
    )
    return parser


def test_controlnet_trains_on_the_frozen_prior(crops, frozen, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(frozen, ckpt)
    parser = parse(crops, ckpt, max_epochs=2)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        parser.parse()
        prior_before = {k: v.clone() for k, v in parser.get_parsed_content("diffusion").state_dict().items()}
        controlnet = parser.get_parsed_content("controlnet")
        cn_before = {k: v.clone() for k, v in controlnet.state_dict().items()}
        # the ControlNet starts from the prior's encoder
        torch.testing.assert_close(cn_before["conv_in.conv.weight"], prior_before["conv_in.conv.weight"])
        dataset = parser.get_parsed_content("train#dataset")
        dataset.transform.set_random_state(0)  # a fixed draw: a crop of air is unchanged by any degradation
        batch = dataset[0][0]
        assert batch["image"].shape == batch["condition"].shape == (1, 32, 32, 16)
        assert not torch.equal(batch["image"], batch["condition"])  # a degraded pair
        parser.get_parsed_content("initialize")
        parser.get_parsed_content("run")
    finally:
        os.chdir(cwd)
    assert parser.get_parsed_content("train#trainer").state.iteration == 12
    for k, v in parser.get_parsed_content("diffusion").state_dict().items():
        torch.testing.assert_close(v, prior_before[k])  # frozen
    saved = torch.load(ckpt / "controlnet.pt", weights_only=True)
    assert any(not torch.equal(saved[k], cn_before[k]) for k in saved)
    # each validation logs the condition, a restoration sampled from it, and the target as TensorBoard images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ckpt / "tb"), size_guidance={"images": 0})
    events.Reload()
    for name in ("restoration_condition", "restoration_sample", "restoration_target"):
        (tag,) = [t for t in events.Tags()["images"] if t.startswith(name)]
        assert [e.step for e in events.Images(tag)] == [1, 2]


def test_the_condition_reaches_the_controlnet_from_its_first_step():
    """MONAI zero-initialises both the ControlNet's output convolutions and its conditioning embedding's last
    layer: then no gradient reaches the condition path until the outputs have grown, and after a step the
    prediction still ignores the condition. The bundle re-initialises the embedding's last layer; the ControlNet
    is a no-op at the start either way."""
    from monai.inferers import ControlNetDiffusionInferer
    from scripts.diffusion import controlnet_from_prior

    tiny = ConfigParser(json.loads((ROOT / "configs" / "tiny.json").read_text()))
    scheduler = ConfigParser(json.loads((ROOT / "configs" / "common.json").read_text())).get_parsed_content(
        "scheduler_def"
    )
    inferer = ControlNetDiffusionInferer(scheduler)
    gen = torch.Generator().manual_seed(0)
    latent, noise, cond = (torch.randn(2, 2, 8, 8, 4, generator=gen) for _ in range(3))
    t = torch.tensor([300, 700])
    steered = {}
    for zero in (True, False):
        torch.manual_seed(0)
        prior = tiny.get_parsed_content("diffusion_def", lazy=False)
        for w in prior.parameters():  # as if trained: an untrained prior's zero output layer passes no gradient
            if not w.detach().abs().sum():
                torch.nn.init.normal_(w, std=0.05)
        cn = controlnet_from_prior(tiny.get_parsed_content("controlnet_def", lazy=False), prior, zero)
        down, mid = cn(x=latent, timesteps=t, controlnet_cond=cond)
        assert not any(d.abs().sum() for d in down) and not mid.abs().sum()  # a no-op at first
        opt = torch.optim.SGD(cn.parameters(), lr=0.1)
        torch.nn.functional.mse_loss(inferer(latent, prior, cn, noise, t, cn_cond=cond), noise).backward()
        opt.step()
        with torch.no_grad():
            pred, blind = (inferer(latent, prior, cn, noise, t, cn_cond=c) for c in (cond, torch.zeros_like(cond)))
        steered[zero] = float((pred - blind).abs().max())
    assert steered[True] == 0.0 and steered[False] > 1e-6


def test_controlnet_needs_the_earlier_stages(crops, tmp_path):
    parser = parse(crops, tmp_path)
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("diffusion")
    from tests.test_autoencoder import _messages

    assert "diffusion.pt: no weights" in _messages(err.value)


def test_controlnet_two_process_ddp_with_mlflow(crops, frozen, tmp_path):
    """Two processes (gloo); rank 0 alone records parameters, metrics and the final checkpoint in MLflow."""
    shutil.copytree(frozen, tmp_path / "ckpt")
    files = "['configs/train_controlnet.json','configs/multi_gpu_train_controlnet.json','configs/tiny.json']"
    res = torchrun(
        files,
        "--datalist",
        str(crops / "datalist.json"),
        "--ckpt_dir",
        str(tmp_path / "ckpt"),
        "--output_dir",
        str(tmp_path / "tb"),
        "--max_epochs",
        "1",
        *tracking(tmp_path / "mlruns.db"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run, artifacts = mlflow_record(tmp_path / "mlruns.db")
    assert {"train_loss", "val_noise_mse", "val_noise_mse_blind"} <= set(run.data.metrics)
    assert run.data.params["max_epochs"] == "1"
    assert {"controlnet_checkpoint_final.pt", "controlnet.pt"} <= artifacts
    saved = torch.load(tmp_path / "ckpt" / "controlnet.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in saved)
