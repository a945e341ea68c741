"""Stage 2: the latent diffusion prior trained on cached latents, with EMA, resume and DDP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scripts.autoencoder import prepare_latents
from tests.conftest import ROOT, mlflow_record, run_config, torchrun, tracking
from tests.test_autoencoder import _messages, tiny_autoencoder

CONFIGS = ["train_diffusion.json", "tiny.json"]


@pytest.fixture(scope="module")
def latents(crops, tmp_path_factory) -> Path:
    """Latents of the real crops from a tiny autoencoder, with its scale factor."""
    out = tmp_path_factory.mktemp("latents")
    prepare_latents(tiny_autoencoder(), str(crops / "datalist.json"), str(out), roi_size=(32, 32, 16))
    (out / "autoencoder_scale.json").write_text(json.dumps({"scale_factor": 1.5}))
    return out


def run_diffusion(latents: Path, ckpt: Path, stop_after_epoch: int | None = None, **overrides):
    ckpt.mkdir(parents=True, exist_ok=True)
    shutil.copy(latents / "autoencoder_scale.json", ckpt)
    return run_config(
        CONFIGS,
        stop_after_epoch,
        datalist=str(latents / "datalist_latents.json"),
        ckpt_dir=str(ckpt),
        output_dir=str(ckpt / "tb"),
        **overrides,
    )


def test_prior_trains_on_scaled_latents_and_keeps_an_ema(latents, tmp_path):
    trainer, losses, parser = run_diffusion(latents, tmp_path / "ckpt", max_epochs=4)
    assert trainer.state.iteration == 24
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    batch = parser.get_parsed_content("train#dataset")[0]
    raw = torch.load(latents / "a_latent.pt", weights_only=True)["latent"]
    assert batch["image"].shape == (2, 16, 16, 8)
    assert float(batch["image"].abs().max()) == pytest.approx(1.5 * float(raw.abs().max()), rel=0.5)
    net, ema = parser.get_parsed_content("diffusion"), parser.get_parsed_content("ema_diffusion")
    assert int(ema.n_averaged) == 24
    differs = [not torch.equal(a, b) for a, b in zip(net.parameters(), ema.module.parameters())]
    assert any(differs)
    best = torch.load(tmp_path / "ckpt" / "diffusion.pt", weights_only=True)  # the EMA weights, by validation
    assert set(best) == set(ema.module.state_dict())
    state = torch.load(tmp_path / "ckpt" / "diffusion_checkpoint_epoch=4.pt", weights_only=True)
    assert {"diffusion", "ema_diffusion", "optimizer", "lr_scheduler", "trainer"} <= set(state)


def test_each_validation_logs_a_decoded_sample_of_the_prior(latents, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(tiny_autoencoder().state_dict(), ckpt / "autoencoder.pt")
    run_diffusion(latents, ckpt, max_epochs=2)
    events = EventAccumulator(str(ckpt / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = [t for t in events.Tags()["images"] if t.startswith("prior_sample")]
    assert tags and len(events.Images(tags[0])) == 2  # one per validation, at epochs 1 and 2
    assert [e.step for e in events.Images(tags[0])] == [1, 2]


def test_validation_pads_a_thin_latent_only_to_the_prior_divisor(tmp_path):
    """A held-out region 3 latent slices deep was padded to the 8 of the patch, so most of the validation patch
    was replicated padding (an easy target that flattered the validation loss); now it is cropped to the patch
    where larger and padded only to what the UNet needs."""
    (tmp_path / "autoencoder_scale.json").write_text(json.dumps({"scale_factor": 1.0}))
    torch.save({"latent": torch.randn(2, 20, 12, 3)}, tmp_path / "thin_latent.pt")
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / c) for c in CONFIGS])
    parser.update({"bundle_root": str(ROOT), "ckpt_dir": str(tmp_path)})
    item = parser.get_parsed_content("validate#preprocessing")({"latent": str(tmp_path / "thin_latent.pt")})
    assert tuple(item["image"].shape) == (2, 16, 12, 4)  # tiny prior: 2 levels, divisor 2


def test_prior_resumes_with_its_ema(latents, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_diffusion(latents, ckpt, stop_after_epoch=2, max_epochs=3)
    resumed, losses, parser = run_diffusion(latents, ckpt, max_epochs=3, resume=True)
    assert len(losses) == 6 and resumed.state.iteration == 18
    assert int(parser.get_parsed_content("ema_diffusion").n_averaged) == 18


def test_prior_needs_the_autoencoder_scale_factor(latents, tmp_path):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / c) for c in CONFIGS])
    parser.update({"ckpt_dir": str(tmp_path)})
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("scale_factor")
    assert "no latent scale factor" in _messages(err.value)


def test_prior_two_process_ddp_with_mlflow(latents, tmp_path):
    """Two processes (gloo); rank 0 alone records parameters, metrics and the final checkpoint in MLflow."""
    shutil.copy(latents / "autoencoder_scale.json", tmp_path)
    files = "['configs/train_diffusion.json','configs/multi_gpu_train_diffusion.json','configs/tiny.json']"
    res = torchrun(
        files,
        "--datalist",
        str(latents / "datalist_latents.json"),
        "--ckpt_dir",
        str(tmp_path),
        "--output_dir",
        str(tmp_path / "tb"),
        "--max_epochs",
        "1",
        *tracking(tmp_path / "mlruns.db"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run, artifacts = mlflow_record(tmp_path / "mlruns.db")
    assert {"train_loss", "val_noise_mse"} <= set(run.data.metrics) and run.data.params["max_epochs"] == "1"
    assert {"diffusion_checkpoint_final.pt", "diffusion.pt"} <= artifacts
    state = torch.load(tmp_path / "diffusion_checkpoint_epoch=1.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 6
    assert not any(k.startswith("module.") for k in state["diffusion"])


def test_prior_matches_the_autoencoder_latents():
    for name in ("inference.json", "tiny.json"):
        cfg = json.loads((ROOT / "configs" / name).read_text())
        assert cfg["diffusion_def"]["in_channels"] == cfg["autoencoder_def"]["latent_channels"]
        assert cfg["diffusion_def"]["out_channels"] == cfg["autoencoder_def"]["latent_channels"]


def test_training_can_start_from_earlier_weights(latents, tmp_path):
    """``--init_weights`` loads the prior and its EMA copy; with the learning rate at 0 the best model kept by
    validation (the EMA's) is exactly the file it started from."""
    torch.manual_seed(1)
    start = (
        ConfigParser(json.loads((ROOT / "configs" / "tiny.json").read_text()))
        .get_parsed_content("diffusion_def")
        .state_dict()
    )
    torch.save(start, tmp_path / "start.pt")
    run_diffusion(
        latents, tmp_path / "ckpt", max_epochs=1, val_interval=1, lr=0.0, init_weights=str(tmp_path / "start.pt")
    )
    best = torch.load(tmp_path / "ckpt" / "diffusion.pt", weights_only=True)
    assert all(torch.equal(best[k], v) for k, v in start.items())
