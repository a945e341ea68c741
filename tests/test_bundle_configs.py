"""The bundle's configs run through `python -m monai.bundle run`, with clear errors and no partial output."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess

import nibabel as nib
import numpy as np
import pytest
from scripts.degradations import thick_slice_affine
from tests.conftest import ROOT, SHARED, assert_user_error, ct_phantom, monai_bundle, train_tiny


def bundle_run(config: str, *args: str) -> subprocess.CompletedProcess:
    return monai_bundle(f"configs/{config}", *args)


def test_simulate_thick_slices_then_evaluate(tmp_path, phantom_file):
    before = hashlib.sha256(phantom_file.read_bytes()).hexdigest()
    out = tmp_path / "thick.nii.gz"
    res = bundle_run(
        "simulate.json",
        "--input_image",
        str(phantom_file),
        "--output_image",
        str(out),
        "--operator",
        "thick_slice",
        "--factor",
        "3",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert hashlib.sha256(phantom_file.read_bytes()).hexdigest() == before  # input untouched
    thick = nib.load(out)
    assert thick.shape == (48, 48, 4)
    np.testing.assert_allclose(thick.affine, thick_slice_affine(nib.load(phantom_file).affine, 12, 3), atol=1e-5)
    record = json.loads((tmp_path / "thick.json").read_text())
    assert record["applied"][0]["factor"] == 3.0

    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"name": "same", "output": str(phantom_file), "reference": str(phantom_file)}]))
    res = bundle_run("evaluate.json", "--cases", str(cases), "--output_dir", str(tmp_path / "eval"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["cases"][0]["mae"] == 0.0


@pytest.mark.parametrize("problem", ["missing", "nan", "2d"])
def test_bad_input_exits_non_zero_with_the_reason_and_no_output(tmp_path, problem):
    src = tmp_path / "in.nii.gz"
    if problem == "nan":
        vol, affine = ct_phantom()
        vol[1, 2, 3] = np.nan
        nib.save(nib.Nifti1Image(vol, affine), src)
    elif problem == "2d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), src)
    out = tmp_path / "out.nii.gz"
    res = bundle_run("simulate.json", "--input_image", str(src), "--output_image", str(out), "--operator", "blur")
    reason = {"missing": "no such file", "nan": "NaN or Inf", "2d": "expected a 3D volume"}[problem]
    assert_user_error(res, f"{src}: ", reason)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == (["in.nii.gz"] if problem != "missing" else [])


def test_metadata_follows_the_bundle_schema():
    schema = SHARED / "schema" / "meta_schema_20240725.json"
    if not schema.exists():
        pytest.skip(f"{schema} is absent (it ships only with the development checkout's ../shared)")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(ROOT / "configs" / "metadata.json"), filepath=str(schema))


META = ROOT / "configs" / "metadata.json"
NETWORKS = ROOT / "configs" / "inference.json"  # the shipped networks' definitions


def test_the_model_card_states_the_metadata_version():
    meta = json.loads(META.read_text())
    stated = re.search(r"\*\*Version (\S+) ships", (ROOT / "docs" / "README.md").read_text())
    assert stated and stated.group(1) == meta["version"] and meta["version"] in meta["changelog"]


def data_format(name: str) -> dict:
    return json.loads(META.read_text())[f"{name}_data_format"]


def spatial(spec: dict, n: int) -> tuple:
    """A metadata spatial_shape such as ["4*n", "n"] evaluated for ``n``."""
    return tuple(int(d.split("*")[0]) * n if "*" in d else n for d in spec["spatial_shape"])


def check_tensor(t, spec: dict, n: int) -> None:
    import torch

    assert t.shape[1:] == (spec["num_channels"], *spatial(spec, n)) and t.dtype == getattr(torch, spec["dtype"])


@pytest.mark.parametrize("name,net_id", [("network", "network_def"), ("diffusion", "diffusion_def")])
def test_data_format_passes_verify_net_in_out(name, net_id):
    """MONAI's own check for the networks with one tensor out: the regression stage (network_def) and the diffusion
    UNet (with its timesteps argument); a wrong channel count in the entry makes it fail."""
    import torch
    from monai.bundle import verify_net_in_out

    spec = data_format(name)
    extra = {"timesteps": torch.tensor([500])} if "timesteps" in spec["inputs"] else {}
    args = dict(
        net_id=net_id, meta_file=str(META), config_file=str(NETWORKS), device="cpu", n=2, extra_forward_args=extra
    )
    verify_net_in_out(**args, **{"_meta_#network_data_format": spec})
    spec["outputs"]["pred"]["num_channels"] += 1
    with pytest.raises(ValueError, match="channel"):
        verify_net_in_out(**args, **{"_meta_#network_data_format": spec})


def test_autoencoder_and_controlnet_data_formats_match_the_networks():
    """``verify_net_in_out`` does not apply (AutoencoderKL and ControlNet return tuples), so every input and
    output of their entries is checked here against the networks built from inference.json."""
    import torch
    from monai.bundle import ConfigParser

    common = ConfigParser(json.loads(NETWORKS.read_text()))
    n = 2
    ae_spec = data_format("autoencoder")
    x = torch.rand(1, ae_spec["inputs"]["image"]["num_channels"], *spatial(ae_spec["inputs"]["image"], n))
    with torch.no_grad():
        outputs = common.get_parsed_content("autoencoder_def").eval()(x)
    assert list(ae_spec["outputs"]) == ["reconstruction", "z_mu", "z_sigma"] and len(outputs) == 3
    for out, spec in zip(outputs, ae_spec["outputs"].values()):
        check_tensor(out, spec, n)

    cn_spec = data_format("controlnet")["inputs"]
    assert list(cn_spec) == ["image", "timesteps", "controlnet_cond", "conditioning_scale"]
    latent = torch.rand(1, cn_spec["image"]["num_channels"], *spatial(cn_spec["image"], n))
    cond = torch.rand(1, cn_spec["controlnet_cond"]["num_channels"], *spatial(cn_spec["controlnet_cond"], n))
    with torch.no_grad():
        down, mid = common.get_parsed_content("controlnet_def").eval()(
            latent, torch.tensor([500]), cond, cn_spec["conditioning_scale"]
        )
    out_spec = data_format("controlnet")["outputs"]
    assert isinstance(down, (tuple, list)) and out_spec["down_block_res_samples"]["type"] == "tuple"
    check_tensor(down[0], out_spec["down_block_res_samples"], n)
    check_tensor(mid, out_spec["mid_block_res_sample"], n)
    # the residuals must fit the prior they steer
    with torch.no_grad():
        pred = common.get_parsed_content("diffusion_def").eval()(
            latent, torch.tensor([500]), down_block_additional_residuals=down, mid_block_additional_residual=mid
        )
    check_tensor(pred, data_format("diffusion")["outputs"]["pred"], n)


def test_the_shipped_networks_fit_the_weight_budget():
    """The networks of inference.json are what models/ ships: together at most 150 MB of float32 weights."""
    from monai.bundle import ConfigParser

    common = ConfigParser(json.loads(NETWORKS.read_text()))
    sizes = {
        name: 4 * sum(p.numel() for p in common.get_parsed_content(f"{name}_def").parameters())
        for name in ("autoencoder", "diffusion", "controlnet", "regression")
    }
    assert sum(sizes.values()) <= 150e6, sizes


@pytest.mark.parametrize("problem", ["missing_entry", "empty", "no_earlier_stage"])
def test_training_commands_report_bad_settings_in_one_line(crops, tmp_path, problem):
    """A datalist entry that does not exist, an empty training list, or a ``--ckpt_dir`` without the earlier
    stage's weights: exit status 2 and one line that names the file and the reason, no traceback."""
    entries = [{"image": str(crops / "c.nii.gz")}]
    if problem == "missing_entry":
        entries.append({"image": str(tmp_path / "gone.nii.gz")})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [] if problem == "empty" else entries, "validation": entries}))
    config = "train_controlnet.json" if problem == "no_earlier_stage" else "train_regression.json"
    res = train_tiny(config, datalist, tmp_path / "models", tmp_path / "tb")
    expected = {
        "missing_entry": f"{tmp_path / 'gone.nii.gz'} listed in 'training' does not exist",
        "empty": "the 'training' list is missing or empty",
        "no_earlier_stage": "diffusion.pt: no weights",
    }
    assert_user_error(res, expected[problem])
