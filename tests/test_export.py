"""TorchScript export (``ckpt_export`` and ``scripts.export``) matches the eager networks, carries the metadata and
configs, and the main job runs from the exported files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export
from scripts.diffusion import ControlledDenoiser
from scripts.export import LatentDecoder, LatentEncoder, denoiser
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.json")
META = str(ROOT / "configs" / "metadata.json")


def tiny_net(name: str, ckpt: Path) -> torch.nn.Module:
    net = ConfigParser(json.loads(Path(TINY).read_text())).get_parsed_content(f"{name}_def")
    net.load_state_dict(torch.load(ckpt / f"{name}.pt", weights_only=True))
    return net.eval()


def export(net_id: str, configs: list[str], ckpt_file: Path, filepath: Path, **kwargs) -> torch.jit.ScriptModule:
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs name configs/common.json relative to the bundle root
    try:
        ckpt_export(
            net_id=net_id,
            filepath=str(filepath),
            ckpt_file=str(ckpt_file),
            meta_file=META,
            config_file=[str(ROOT / "configs" / c) for c in configs] + [TINY],
            **kwargs,
        )
    finally:
        os.chdir(cwd)
    extra = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(str(filepath), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == json.loads(Path(META).read_text())["version"]
    assert "networks" in json.loads(extra["inference.json"])  # the configs travel with the network
    return ts


def export_halves(ckpt_file: Path, folder: Path, encoder_shape: list[int], **overrides) -> dict:
    """The autoencoder's traced halves from ``ckpt_file``, written to ``folder/encoder.ts`` and ``folder/decoder.ts``
    (the tiny latent has 2 channels)."""
    return {
        half: export(
            f"{half}_def",
            ["inference.json", "export.json"],
            ckpt_file,
            folder / f"{half}.ts",
            use_trace=True,
            input_shape=shape,
            **overrides,
        )
        for half, shape in (("encoder", encoder_shape), ("decoder", [1, 2, 8, 8, 8]))
    }


def test_ckpt_export_of_the_autoencoder_halves_and_the_regression_peer(weights, tmp_path):
    ae = tiny_net("autoencoder", weights)
    halves = export_halves(weights / "autoencoder.pt", tmp_path, [1, 1, 32, 32, 32])
    enc, dec = halves["encoder"], halves["decoder"]
    x = torch.rand(1, 1, 48, 32, 16)  # another shape than the trace's
    with torch.no_grad():
        z = ae.encode(x)[0]
        torch.testing.assert_close(enc(x), z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dec(z), ae.decode(z), rtol=1e-4, atol=1e-5)
    assert set(LatentEncoder(ae).state_dict()) == set(LatentDecoder(ae).state_dict()) == set(ae.state_dict())

    torch.manual_seed(0)
    reg = ConfigParser(json.loads(Path(TINY).read_text())).get_parsed_content("regression_def").eval()
    torch.save(reg.state_dict(), tmp_path / "model.pt")
    ts = export(
        "regression_def", ["inference.json"], tmp_path / "model.pt", tmp_path / "regression.ts"
    )  # scripted, not traced
    assert isinstance(ts, torch.jit.RecursiveScriptModule)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), reg(x), rtol=1e-4, atol=1e-5)


def test_slice_wise_autoencoder_halves_export_and_keep_every_slice(tmp_path):
    """The default autoencoder is slice-wise: its traced halves take volumes of any shape (slices folded into the
    batch inside the trace) and match the eager network; the exported files keep its latent grid (x/f, y/f, z)."""
    from scripts.autoencoder import SliceAutoencoderKL, downsample_factors
    from scripts.export import ExportedAutoencoder

    slice_wise = {"autoencoder_def#_target_": "scripts.autoencoder.SliceAutoencoderKL"}
    parser = ConfigParser(json.loads(Path(TINY).read_text()))
    parser.update(slice_wise)
    torch.manual_seed(0)
    ae = parser.get_parsed_content("autoencoder_def").eval()
    assert isinstance(ae, SliceAutoencoderKL)
    torch.save(ae.state_dict(), tmp_path / "autoencoder.pt")
    halves = export_halves(tmp_path / "autoencoder.pt", tmp_path, [1, 1, 32, 32, 8], **slice_wise)
    x = torch.rand(2, 1, 48, 32, 5)  # another batch, shape and slice count than the trace's
    with torch.no_grad():
        z = ae.encode(x)[0]
        assert z.shape == (2, 2, 24, 16, 5)
        torch.testing.assert_close(halves["encoder"](x), z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(halves["decoder"](z), ae.decode(z), rtol=1e-4, atol=1e-5)
    exported = ExportedAutoencoder(halves["encoder"], halves["decoder"], 2, 2, slice_wise=True)
    assert downsample_factors(exported) == downsample_factors(ae) == (2, 2, 1)
    flag = ConfigParser(parser.config, globals={"scripts": "scripts"})
    flag["flag"] = "$scripts.autoencoder.slice_wise_target(@autoencoder_def#_target_)"  # inference_exported.json's
    assert flag.get_parsed_content("flag") is True


def test_traced_denoiser_matches_and_the_main_job_runs_from_exported_files(crops, weights, tmp_path):
    exported = tmp_path / "exported"
    exported.mkdir()
    denoiser(str(weights), str(exported / "denoiser.ts"), config_file=TINY)
    eager = ControlledDenoiser(tiny_net("diffusion", weights), tiny_net("controlnet", weights)).eval()
    ts = torch.jit.load(str(exported / "denoiser.ts"))
    z, cond = torch.randn(1, 2, 16, 8, 8), torch.randn(1, 2, 16, 8, 8)  # the condition: encoded, on the latent grid
    with torch.no_grad():
        for t in (3, 700):  # the timestep is an input, not a constant of the trace
            torch.testing.assert_close(
                ts(z, torch.tensor([t]), cond), eager(z, torch.tensor([t]), cond), rtol=1e-4, atol=1e-5
            )
    export_halves(weights / "autoencoder.pt", exported, [1, 1, 32, 32, 32])
    (exported / "autoencoder_scale.json").write_text((weights / "autoencoder_scale.json").read_text())

    outs = {}
    for name, configs, ckpt in (
        ("eager", "['configs/inference.json','configs/inference_diffusion.json','configs/tiny.json']", weights),
        (
            "exported",
            "['configs/inference.json','configs/inference_diffusion.json','configs/tiny.json',"
            "'configs/inference_exported.json']",
            exported,
        ),
    ):
        outs[name] = tmp_path / f"{name}.nii.gz"
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                configs,
                "--input_image",
                str(crops / "c.nii.gz"),
                "--output_image",
                str(outs[name]),
                "--ckpt_dir",
                str(ckpt),
                "--num_inference_steps",
                "2",
                "--device",
                "cpu",
                "--amp",
                "false",
            ],  # float32 both: a traced network does not follow autocast
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = (np.asarray(nib.load(outs[k]).dataobj).astype(np.int32) for k in ("eager", "exported"))
    assert np.abs(a - b).max() <= 1  # int16 HU: equal up to rounding


def test_exported_inference_names_a_missing_file(tmp_path):
    from scripts.export import load_exported

    with pytest.raises(FileNotFoundError, match="encoder.ts: no exported network"):
        load_exported(tmp_path, 2, 2)
