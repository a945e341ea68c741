"""The 2.5D autoencoder: a 2D AutoencoderKL run slice by slice keeps every slice, the grid and the field of view."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import AutoencoderKL
from scripts.autoencoder import (
    SliceAutoencoderKL,
    decode_volume,
    downsample_factors,
    encode_volume,
    latent_affine,
    latent_roi,
    pad_for,
    reconstruct_volume,
)
from tests.conftest import ROOT
from tests.test_inference import bundle

TINY = {
    "in_channels": 1,
    "out_channels": 1,
    "channels": [8, 16],
    "latent_channels": 2,
    "num_res_blocks": [1, 1],
    "attention_levels": [False, False],
    "norm_num_groups": 4,
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "include_fc": False,
}


def _tiny() -> SliceAutoencoderKL:
    torch.manual_seed(0)
    return SliceAutoencoderKL(**TINY).eval()


def test_each_slice_is_the_2d_autoencoder_on_that_slice():
    ae = _tiny()
    plain = AutoencoderKL(spatial_dims=2, **TINY).eval()
    plain.load_state_dict(ae.state_dict())  # the same weights: a plain 2D state dict
    x = torch.randn(2, 1, 16, 12, 5)
    with torch.no_grad():
        mu, sigma = ae.encode(x)
        assert mu.shape == (2, 2, 8, 6, 5) and sigma.shape == mu.shape
        torch.testing.assert_close(mu[1, :, :, :, 3], plain.encode(x[1:2, :, :, :, 3])[0][0])
        out = ae.decode(mu)
        assert out.shape == x.shape
        torch.testing.assert_close(out[0, :, :, :, 4], plain.decode(mu[0:1, :, :, :, 4])[0])
        recon, _, _ = ae(x)
        assert recon.shape == x.shape
    assert downsample_factors(ae) == (2, 2, 1) and downsample_factors(plain) == (2, 2, 2)


def test_windowed_encode_decode_keeps_slice_count_and_fov():
    ae = _tiny()
    x = torch.randn(1, 1, 45, 38, 7)
    padded, crop = pad_for(ae, x, latent_multiple=2)
    assert padded.shape[-1] == 8 and padded.shape[2] % 4 == 0  # z padded for the UNet only, never downsampled
    with torch.no_grad():
        z = encode_volume(ae, padded, roi_size=(24, 24, 4), overlap=0.25)
        assert z.shape == (1, 2, padded.shape[2] // 2, padded.shape[3] // 2, 8)
        whole = ae.encode(padded)[0]
        # per-slice networks: windows along z are exact; in-plane windows differ only through GroupNorm statistics
        assert float((z - whole).abs().mean()) < 0.1 * float(whole.abs().mean())
        out = decode_volume(ae, z, latent_roi(ae, (24, 24, 4)))
        assert out.shape == padded.shape
        rec = reconstruct_volume(ae, x, (24, 24, 4))
        assert rec.shape == x.shape
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 20.0]
    lat = latent_affine(ae, affine)
    np.testing.assert_allclose(np.diag(lat)[:3], [1.6, 1.6, 3.0])
    # the first latent voxel sits at the centre of the 2x2 image voxels it covers, on the first slice
    np.testing.assert_allclose(lat[:3, 3], [-10.0 + 0.4, 5.0 + 0.4, 20.0])


def test_main_job_with_a_slice_autoencoder_keeps_grid_and_units(tmp_path):
    """The main job end to end with tiny networks and a slice-wise autoencoder: super-resolution 2 -> 1 mm slices
    keeps the FOV, restoration keeps the grid and affine."""
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    tiny = ConfigParser.load_config_file(ROOT / "configs" / "tiny.json")
    tiny["autoencoder_def"]["_target_"] = "scripts.autoencoder.SliceAutoencoderKL"
    parser = ConfigParser(tiny)
    torch.manual_seed(0)
    for name in ("autoencoder", "diffusion", "controlnet"):
        torch.save(parser.get_parsed_content(f"{name}_def").state_dict(), ckpt / f"{name}.pt")
    (ckpt / "autoencoder_scale.json").write_text(json.dumps({"scale_factor": 1.2}))
    vol = np.full((40, 36, 10), -1000.0, dtype=np.float32)
    vol[8:32, 8:28, 2:8] = 40.0
    affine = np.diag([0.9, 0.9, 2.0, 1.0])
    affine[:3, 3] = [-12.0, 7.0, 30.0]
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), src)
    for spacing, shape in ((None, (40, 36, 10)), ("[0.9,0.9,1.0]", (40, 36, 20))):
        out = tmp_path / f"out_{shape[2]}.nii.gz"
        res = bundle(
            "--input_image",
            str(src),
            "--output_image",
            str(out),
            "--ckpt_dir",
            str(ckpt),
            "--device",
            "cpu",
            "--num_inference_steps",
            "2",
            "--autoencoder_def#_target_",
            "scripts.autoencoder.SliceAutoencoderKL",
            *(["--target_spacing", spacing] if spacing else []),
        )
        assert res.returncode == 0, res.stderr[-3000:]
        img = nib.load(out)
        assert img.shape == shape
        assert img.get_data_dtype() == np.int16
        ends = [img.affine @ np.array([0, 0, k, 1.0]) for k in (-0.5, shape[2] - 0.5)]
        np.testing.assert_allclose([e[2] for e in ends], [29.0, 49.0], atol=1e-4)  # same FOV along z
        np.testing.assert_allclose(img.affine[:2], affine[:2], atol=1e-5)


def test_the_default_is_slice_wise_and_the_3d_override_loads_3d_weights(tmp_path):
    """``configs/inference.json``'s autoencoder keeps every slice in its latent; ``configs/autoencoder_3d.json``
    after it builds the 3D one of the same widths, into which 3D weights load, and gives the prior its 3D latent
    patch."""
    from scripts.autoencoder import load_autoencoder_weights
    from scripts.enhance import inference_parser

    default = inference_parser(["configs/inference.json"], load_networks=False)
    three_d = inference_parser(["configs/inference.json", "configs/autoencoder_3d.json"], load_networks=False)
    ae, ae3d = default.get_parsed_content("autoencoder_def"), three_d.get_parsed_content("autoencoder_def")
    assert isinstance(ae, SliceAutoencoderKL) and type(ae3d) is AutoencoderKL
    assert ae3d.encoder.channels == ae.encoder.channels
    with torch.no_grad():
        assert ae.eval().encode(torch.rand(1, 1, 16, 16, 5))[0].shape == (1, 4, 4, 4, 5)
    torch.manual_seed(0)
    saved = three_d.get_parsed_content("autoencoder_def", lazy=False)  # another instance, other weights
    torch.save(saved.state_dict(), tmp_path / "autoencoder.pt")
    loaded = load_autoencoder_weights(ae3d, tmp_path / "autoencoder.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    for extra, patch in (([], [32, 32, 16]), (["configs/autoencoder_3d.json"], [32, 32, 8])):
        parser = inference_parser(["configs/train_diffusion.json", *extra], load_networks=False)
        assert list(parser.get_parsed_content("latent_patch_size")) == patch
