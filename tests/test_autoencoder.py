"""Stage 1: the VAE-GAN training run on a real crop, resume, DDP, windowed encode/decode, old checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import AutoencoderKL
from scripts.autoencoder import (
    _starts,
    decode_volume,
    encode_volume,
    load_autoencoder_weights,
    load_scale_factor,
    reconstruct_volume,
)
from scripts.checkpoints import TimeBudget
from tests.conftest import SAMPLE, monai_bundle, run_config, torchrun, tracked_training
from tests.test_checkpoints import fake_clock

CONFIGS = ["train_autoencoder.json", "tiny.json"]


def tiny_autoencoder(**kw) -> AutoencoderKL:
    args = dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=[8, 16],
        latent_channels=2,
        num_res_blocks=[1, 1],
        attention_levels=[False, False],
        norm_num_groups=4,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        include_fc=False,
    )
    args.update(kw)
    torch.manual_seed(0)
    return AutoencoderKL(**args).eval()


def _messages(err: BaseException | None) -> str:
    """The messages of an exception and of its causes (the bundle parser wraps errors)."""
    out = []
    while err is not None:
        out.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(out)


def run_training(crops: Path, ckpt: Path, **overrides):
    settings = {"datalist": str(crops / "datalist.json"), "ckpt_dir": str(ckpt), "output_dir": str(ckpt / "tb")}
    return run_config(CONFIGS, None, "l1", **{**settings, **overrides})


def test_tiny_training_loss_falls_and_writes_checkpoints(trained):
    ckpt, trainer, losses, _ = trained
    assert trainer.state.iteration == 18
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert (ckpt / "autoencoder.pt").is_file()  # best by validation PSNR
    assert (ckpt / "autoencoder_checkpoint_epoch=3.pt").is_file()
    assert load_scale_factor(str(ckpt)) > 0
    assert list((ckpt / "tb").glob("events.out.tfevents.*"))
    state = torch.load(ckpt / "autoencoder_checkpoint_epoch=3.pt", weights_only=True)
    assert set(state) == {
        "autoencoder",
        "discriminator",
        "optimizer",
        "d_optimizer",
        "lr_scheduler",
        "validation",
        "trainer",
        "amp_scalers",
    }
    assert state["validation"]["best_metric_epoch"] in (1, 2, 3)  # the best-model record travels with a resume
    load_autoencoder_weights(tiny_autoencoder(), ckpt / "autoencoder.pt")


def test_validation_logs_input_and_reconstruction_images(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained[0] / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    for name in ("input_0", "output"):  # TensorBoardImageHandler's tags: the validation input and its reconstruction
        (tag,) = [t for t in tags if t.startswith(name)]
        assert [e.step for e in events.Images(tag)] == [1, 2, 3]  # one per validation (every epoch in tiny.json)


def test_a_time_budget_stops_on_an_epoch_and_resume_continues(crops, trained, tmp_path, monkeypatch):
    _, full_trainer, _, full_parser = trained
    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(TimeBudget, "clock", fake_clock(10.0))  # each epoch "takes" 10 s: 2 fit in 25 s, not 3
    stopped, _, _ = run_training(crops, ckpt, max_epochs=3, max_seconds=25)
    assert stopped.state.epoch == 2
    assert (ckpt / "autoencoder_checkpoint_epoch=2.pt").is_file() and (ckpt / "autoencoder.pt").is_file()
    assert not (ckpt / "autoencoder_checkpoint_epoch=3.pt").exists()
    resumed, losses, parser = run_training(crops, ckpt, max_epochs=3, resume=True)
    assert len(losses) == 6 and resumed.state.iteration == 18 and resumed.state.epoch == 3
    lr = parser.get_parsed_content("optimizer").param_groups[0]["lr"]
    assert lr == pytest.approx(full_parser.get_parsed_content("optimizer").param_groups[0]["lr"])
    with pytest.raises(Exception) as err:
        run_training(crops, tmp_path / "empty", max_epochs=1, resume=True)
    assert "resume requested but no autoencoder_checkpoint" in _messages(err.value)
    fresh, _, _ = run_training(crops, tmp_path / "empty", max_epochs=1, resume="auto")  # no checkpoint: from scratch
    assert fresh.state.iteration == 6


def test_bad_datalists_fail_clearly(crops, tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps({"training": [], "validation": []}))
    with pytest.raises(Exception) as err:
        run_training(crops, tmp_path / "c1", datalist=str(tmp_path / "empty.json"))
    assert "empty.json: the 'training' list is missing or empty" in _messages(err.value)
    (tmp_path / "gone.json").write_text(
        json.dumps(
            {"training": [{"image": str(crops / "nope.nii.gz")}], "validation": [{"image": str(crops / "c.nii.gz")}]}
        )
    )
    with pytest.raises(Exception) as err:
        run_training(crops, tmp_path / "c2", datalist=str(tmp_path / "gone.json"))
    assert "nope.nii.gz listed in 'training' does not exist" in _messages(err.value)


def test_two_process_ddp_run_on_gloo(crops, tmp_path):
    files = "['configs/train_autoencoder.json','configs/multi_gpu_train_autoencoder.json','configs/tiny.json']"
    res = torchrun(
        files,
        "--datalist",
        str(crops / "datalist.json"),
        "--ckpt_dir",
        str(tmp_path),
        "--output_dir",
        str(tmp_path / "tb"),
        "--max_epochs",
        "2",
        "--max_seconds",
        "0.001",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "autoencoder_checkpoint_epoch=2.pt").exists()  # both ranks kept the time budget
    state = torch.load(tmp_path / "autoencoder_checkpoint_epoch=1.pt", weights_only=True)
    # each rank sees half of the 2 volumes x 2 crops per epoch (DistributedSampler), 6 iterations each
    assert state["trainer"]["iteration"] == 6
    assert not any(k.startswith("module.") for k in state["autoencoder"])


def _real_input() -> torch.Tensor:
    v = np.asarray(nib.load(SAMPLE).dataobj)[:, :, :16].astype(np.float32)
    return torch.as_tensor((v + 1000) / 2000)[None, None]


def test_windowed_decode_matches_the_whole_volume_within_tolerance():
    ae, x = tiny_autoencoder(), _real_input()
    with torch.no_grad():
        z = ae.encode(x)[0]
        whole = ae.decode(z)
    # a window that covers everything is exact
    torch.testing.assert_close(decode_volume(ae, z, z.shape[2:], 0.25), whole)
    torch.testing.assert_close(encode_volume(ae, x, x.shape[2:], 0.25), z)
    # smaller windows differ only through per-window GroupNorm statistics: stated tolerance 12% of the std
    sw = decode_volume(ae, z, (48, 48, 8), 0.5, halo=8)
    assert (sw - whole).abs().mean() < 0.12 * whole.std()
    zs = encode_volume(ae, x, (96, 96, 16), 0.5, halo=32)
    assert (zs - z).abs().mean() < 0.12 * z.std()


def _border_ratio(halo: int) -> float:
    ae, x = tiny_autoencoder(), _real_input()
    with torch.no_grad():
        z = ae.encode(x)[0]
        whole = ae.decode(z)
    err = (decode_volume(ae, z, (48, 48, 8), 0.25, halo=halo) - whole).abs()[0, 0].mean(dim=(1, 2))
    starts = _starts(z.shape[2], 48, 36)
    borders = {2 * s for s in starts} | {2 * (s + 48) for s in starts}
    near = np.zeros(err.shape[0], bool)
    for b in borders:
        if 0 < b < err.shape[0]:
            near[max(0, b - 3) : b + 3] = True
    return float(err[near].mean() / err[~near].mean())


def test_no_seams_at_window_borders():
    assert _border_ratio(halo=4) < 1.2
    assert _border_ratio(halo=0) > 1.3  # without the halo the borders do show: the check can fail


def test_reconstruct_volume_keeps_odd_shapes():
    ae = tiny_autoencoder()
    x = torch.rand(1, 1, 37, 30, 11)
    assert reconstruct_volume(ae, x, (32, 32, 8)).shape == x.shape


def test_old_monai_generative_checkpoint_loads(tmp_path):
    kw = dict(
        attention_levels=[False, True],
        with_encoder_nonlocal_attn=True,
        with_decoder_nonlocal_attn=True,
        include_fc=True,
    )
    new = tiny_autoencoder(**kw)
    old = {}
    for k, v in new.state_dict().items():  # the MONAI Generative names of the same weights
        k = k.replace("postconv", "conv").replace(".attn.out_proj.", ".proj_attn.").replace(".attn.to_", ".to_")
        old[k] = v.clone()
    assert old.keys() != new.state_dict().keys()
    torch.save(old, tmp_path / "old.pt")
    fresh = load_autoencoder_weights(_reinit(kw), tmp_path / "old.pt")
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh.reconstruct(x), new.reconstruct(x))


def _reinit(kw) -> AutoencoderKL:
    torch.manual_seed(123)
    args = dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=[8, 16],
        latent_channels=2,
        num_res_blocks=[1, 1],
        norm_num_groups=4,
    )
    return AutoencoderKL(**args, **kw).eval()


def test_prepare_latents_writes_latents_and_a_datalist(trained, crops, tmp_path):
    ckpt = trained[0]
    res = monai_bundle(
        "['configs/prepare_latents.json','configs/tiny.json']",
        "--ckpt_dir",
        str(ckpt),
        "--datalist",
        str(crops / "datalist.json"),
        "--output_dir",
        str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    dl = json.loads((tmp_path / "datalist_latents.json").read_text())
    assert [e["latent"] for e in dl["training"]] == ["a_latent.pt", "b_latent.pt"]
    item = torch.load(tmp_path / "a_latent.pt", weights_only=True)
    assert item["latent"].shape == (2, 32, 32, 8) and item["image_shape"] == [64, 64, 16]
    assert item["intensity"]["modality"] == "ct"
    src = nib.load(crops / "a.nii.gz").affine
    # latent voxel 0 is the centre of image voxels 0..1 (factor 2): FOV preserved
    np.testing.assert_allclose(item["affine"].numpy() @ [0, 0, 0, 1], src @ [0.5, 0.5, 0.5, 1], atol=1e-5)


def test_tracking_with_mlflow_records_parameters_metrics_and_the_final_checkpoint(crops, tmp_path):
    run, artifacts = tracked_training("train_autoencoder.json", crops, tmp_path)
    assert {"train_loss", "val_psnr", "val_ssim", "val_mae"} <= set(run.data.metrics)
    assert run.data.params["max_epochs"] == "1"
    assert {"autoencoder_checkpoint_final.pt", "autoencoder.pt"} <= artifacts
    assert list((tmp_path / "out").glob("events.out.tfevents.*"))  # TensorBoard by default
