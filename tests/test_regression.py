"""The supervised regression peer: trained on the same on-the-fly pairs, run through the same contract."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scripts.regression import PlaneResidualNet, PlaneUNet, axial_windows, plane_pairs
from scripts.trainers import identity_start
from tests.conftest import ROOT, monai_bundle, tracked_training
from tests.test_pipeline import _run


def test_regression_peer_trains_and_enhances(crops, tmp_path):
    ckpt = tmp_path / "models"
    parser = _run(
        ["train_regression.json", "tiny.json"],
        datalist=str(crops / "datalist.json"),
        ckpt_dir=str(ckpt),
        output_dir=str(tmp_path / "tb"),
        max_epochs=2,
    )
    assert parser.get_parsed_content("train#trainer").state.iteration == 12
    assert set(torch.load(ckpt / "model.pt", weights_only=True)) == set(
        parser.get_parsed_content("regression").state_dict()
    )
    out = tmp_path / "reg.nii.gz"
    res = monai_bundle(
        "['configs/inference.json','configs/tiny.json']",
        "--input_image",
        str(crops / "c.nii.gz"),
        "--output_image",
        str(out),
        "--ckpt_dir",
        str(ckpt),
        "--target_spacing",
        "[1.1406, 1.1406, 2.5]",
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    img = nib.load(out)
    assert img.shape == (64, 64, 32) and img.get_data_dtype() == np.int16


def test_the_restoration_override_trains_the_same_grid_specialist(crops, tmp_path):
    """``configs/train_restoration.json``: the same recipe on the same-grid task (denoising) of CT volumes only,
    saved under its own name so that it never overwrites the super-resolution network."""
    ckpt, start = tmp_path / "models", tmp_path / "two_view.pt"
    torch.manual_seed(0)
    two_view = ConfigParser.load_config_file(ROOT / "configs" / "tiny.json")["regression_def"]
    torch.save(ConfigParser({"net": two_view}).get_parsed_content("net").state_dict(), start)
    parser = _run(
        ["train_regression.json", "train_restoration.json", "tiny.json"],
        datalist=str(crops / "datalist.json"),
        ckpt_dir=str(ckpt),
        output_dir=str(tmp_path / "tb"),
        max_epochs=1,
        init_weights=str(start),
    )
    names = {p.name for p in ckpt.iterdir()}
    assert "restoration_ct.pt" in names and not any(n.startswith("regression") for n in names)
    kinds = {m: type(t).__name__ for m, t in parser.get_parsed_content("degradations").items()}
    assert kinds == {"ct": "RandCachedLowDoseCTd", "mr": "RandRicianNoised"}
    # the restoration network is the three-view one, warm-started from two-view weights; both CNNs trained
    trained, initial = torch.load(ckpt / "restoration_ct.pt", weights_only=True), torch.load(start, weights_only=True)
    for head in ("body.", "axial_body."):
        assert not torch.equal(trained[head + "0.weight"], initial["body.0.weight"]), head


def test_same_grid_volumes_go_to_the_restoration_network():
    """The main job's regression method: the restoration network (of the volume's modality) on the same grid, the
    super-resolution network when the grid changes, and the latter for both when no restoration network is given."""
    from monai.data import MetaTensor
    from scripts.enhance import enhance_volume

    class Shift(torch.nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = torch.nn.Parameter(torch.tensor(value))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.value

    image = MetaTensor(100 * torch.rand(1, 16, 16, 8), affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])))
    kw = {"modality": "ct", "method": "regression", "progress": False, "sliding_window": {"roi_size": [16, 16, 16]}}
    sr, rest = Shift(0.1), Shift(-0.1)

    def run(networks: dict, spacing: list | None) -> torch.Tensor:
        return enhance_volume(image, networks, spacing, **kw)[0]

    for both in ({"regression": sr, "restoration": rest}, {"regression": sr, "restoration": {"ct": rest, "mr": None}}):
        assert (run(both, None) < run({"regression": sr}, None) - 10).all()  # -0.1 against +0.1 (of 1000 HU)
        torch.testing.assert_close(run(both, [1.0, 1.0, 1.0]), run({"regression": sr}, [1.0, 1.0, 1.0]))
    only_mr = {"regression": sr, "restoration": {"ct": None, "mr": rest}}  # no CT specialist: the SR network
    torch.testing.assert_close(run(only_mr, None), run({"regression": sr}, None))


def test_degradation_picks_the_k_space_network_and_refuses_what_it_cannot_do():
    """``--degradation kspace``: the modality's k-space network on the input's grid; no such network, a new grid
    or an unknown degradation is a clear error, not a silent fall back to the denoiser."""
    from scripts.enhance import regression_for
    from scripts.errors import InputError

    sr, noise, kspace = torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()
    nets = {"regression": sr, "restoration": {"ct": noise, "mr": noise, "mr_kspace": kspace}}
    assert regression_for(nets, True, "mr", "kspace") is kspace
    assert regression_for(nets, True, "mr") is noise and regression_for(nets, False, "mr") is sr
    with pytest.raises(InputError, match=r"--degradation kspace: no CT network for it \(restoration_ct_kspace.pt"):
        regression_for(nets, True, "ct", "kspace")
    with pytest.raises(InputError, match="own grid; drop --target_spacing"):
        regression_for(nets, False, "mr", "kspace")
    with pytest.raises(InputError, match="must be one of noise, kspace, blur, got 'motion'"):
        regression_for(nets, True, "mr", "motion")
    with pytest.raises(InputError, match="no MR network"):
        regression_for({"regression": sr, "restoration": noise}, True, "mr", "kspace")


def test_k_space_consistency_gives_back_the_input_band_and_only_helps():
    """``--degradation kspace --kspace_factor F`` with data consistency: the output truncates to the input exactly,
    and it is never further from a truth the input was cut from than the network's output was."""
    from monai.data import MetaTensor
    from scripts.degradations import kspace_truncate
    from scripts.enhance import enhance_volume, kspace_consistency
    from scripts.errors import InputError

    torch.manual_seed(0)
    truth = 10 + torch.rand(32, 24, 6).cumsum(0)
    observed = kspace_truncate(truth, 2.0)
    guess = observed + 0.3 * torch.randn_like(truth)
    fixed = kspace_consistency(guess, observed, 2.0)
    torch.testing.assert_close(kspace_truncate(fixed, 2.0), observed, atol=1e-4, rtol=0)
    assert (fixed - truth).norm() < (guess - truth).norm()
    image = MetaTensor(observed[None], affine=torch.eye(4))
    nets = {"regression": torch.nn.Identity(), "restoration": {"mr_kspace": torch.nn.Identity()}}
    kw = {"modality": "mr", "method": "regression", "progress": False, "degradation": "kspace"}
    kw["sliding_window"] = {"roi_size": [32, 24, 6]}
    out = enhance_volume(image, nets, consistency=True, kspace_factor=2.0, **kw)[0]
    torch.testing.assert_close(kspace_truncate(out[0], 2.0), observed, atol=1e-3, rtol=0)
    with pytest.raises(InputError, match="--kspace_factor: the in-plane truncation factor is >= 1, got 0.5"):
        enhance_volume(image, nets, consistency=True, kspace_factor=0.5, **kw)


def test_the_k_space_override_trains_on_k_space_truncation_only():
    """``configs/train_restoration_mr_kspace.json``: MR volumes only, k-space truncation pairs, its own weights
    file (``restoration_mr_kspace.pt``, which the main job loads for ``--degradation kspace``)."""
    parser = ConfigParser()
    names = ["train_regression.json", "train_restoration.json", "train_restoration_mr_kspace.json"]
    parser.read_config([str(ROOT / "configs" / n) for n in names])
    assert parser.get_parsed_content("weights_file") == "restoration_mr_kspace.pt"
    assert parser["modalities"] == ["mr"]
    assert type(parser.get_parsed_content("degradations#mr")).__name__ == "RandKSpaceTruncated"
    inference = ConfigParser.load_config_file(ROOT / "configs" / "inference.json")
    assert "restoration_mr_kspace.pt" in inference["restoration"]["mr_kspace"]


def test_regression_training_with_mlflow(crops, tmp_path):
    run, artifacts = tracked_training("train_regression.json", crops, tmp_path)
    assert {"train_loss", "val_l1"} <= set(run.data.metrics) and run.data.params["max_epochs"] == "1"
    assert {"regression_checkpoint_final.pt", "model.pt"} <= artifacts


def test_regression_peer_learns_a_residual_over_its_input():
    """Every size of the peer (and the 3D UNet override) adds its body's output to the resampled input
    (VDSR-style residual learning): with that output at zero it returns the input unchanged, so training starts
    from interpolation, not from zero."""
    for name in ("inference.json", "small.json", "tiny.json", "regression_unet3d.json"):
        net = ConfigParser.load_config_file(ROOT / "configs" / name)["regression_def"]
        peer = identity_start(ConfigParser({"net": net}).get_parsed_content("net")).eval()
        x = torch.randn(1, 1, 32, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(peer(x), x, msg=name)


def test_near_identity_start_gives_every_layer_a_gradient():
    """``identity_start(net, 0.1)``, the restoration configs' start: the output stays within a small residual of
    the input, and unlike the exact identity (a saddle) the first layer gets a gradient at the first step."""
    net = ConfigParser.load_config_file(ROOT / "configs" / "tiny.json")["regression_def"]
    x = torch.rand(1, 1, 16, 16, 8)
    first_grads = {}
    for scale in (0.0, 0.1):
        torch.manual_seed(0)
        peer = identity_start(ConfigParser({"net": net}).get_parsed_content("net"), scale)
        out = peer(x)
        assert (out - x).abs().max() < 0.1 * x.abs().max()
        (out - 0.9 * x).pow(2).mean().backward()
        first = [m for m in peer.modules() if isinstance(m, torch.nn.Conv2d)][0]
        first_grads[scale] = float(first.weight.grad.abs().sum())
    assert first_grads[0.0] == 0.0 and first_grads[0.1] > 0.0
    assert json.loads((ROOT / "configs" / "train_restoration.json").read_text())["start_scale"] == 0.1


def test_data_consistency_applies_to_the_regression_peer():
    """``--data_consistency true`` with ``--method regression``: the output's slabs give the input back (it was
    silently ignored for the peer before 0.9.0)."""
    from monai.data import MetaTensor
    from scripts.enhance import enhance_volume, slab_matrix
    from scripts.grid import apply_along_axis

    torch.manual_seed(0)
    tiny = ConfigParser.load_config_file(ROOT / "configs" / "tiny.json")["regression_def"]
    peer = ConfigParser({"net": tiny}).get_parsed_content("net")
    identity_start(peer)  # the peer returns trilinear interpolation, whose slabs miss the input
    y = 50 * torch.rand(1, 32, 32, 8)
    image = MetaTensor(y, affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])))
    common = {
        "target_spacing": [1.0, 1.0, 1.0],
        "modality": "ct",
        "method": "regression",
        "progress": False,
        "sliding_window": {"roi_size": [32, 32, 16], "overlap": 0.25},
    }
    misfit = {}
    for dc in (False, True):
        out = enhance_volume(image, {"regression": peer}, consistency=dc, **common)[0]
        assert out.shape == (1, 32, 32, 16)
        misfit[dc] = float((apply_along_axis(out.double(), slab_matrix(8, 16), 3) - y).abs().max())
    assert misfit[True] < 1e-3 < misfit[False]


def test_training_can_start_from_earlier_weights(crops, tmp_path):
    """``--init_weights``: with the learning rate at 0 the trained peer is exactly the file it started from."""
    torch.manual_seed(1)
    tiny = ConfigParser.load_config_file(ROOT / "configs" / "tiny.json")["regression_def"]
    start = ConfigParser({"net": tiny}).get_parsed_content("net").state_dict()
    torch.save(start, tmp_path / "start.pt")
    parser = _run(
        ["train_regression.json", "tiny.json"],
        datalist=str(crops / "datalist.json"),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "tb"),
        max_epochs=1,
        lr=0.0,
        init_weights=str(tmp_path / "start.pt"),
    )
    trained = parser.get_parsed_content("regression").state_dict()
    assert all(torch.equal(trained[k].cpu(), v) for k, v in start.items())


def test_the_training_config_starts_the_peer_as_the_identity(crops, tmp_path):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train_regression.json"), str(ROOT / "configs" / "tiny.json")])
    parser.update({"bundle_root": str(ROOT), "datalist": str(crops / "datalist.json")})
    peer = parser.get_parsed_content("regression").eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(peer(x), x)


def _plane_reference(net: PlaneResidualNet, x: torch.Tensor, axis: int) -> torch.Tensor:
    """The body's residual plane by plane across ``axis``, with edge-replicated neighbours (a plain loop)."""
    out, n, c = torch.zeros_like(x), x.shape[axis], net.context
    for k in range(n):
        idx = torch.tensor([min(max(j, 0), n - 1) for j in range(k - c, k + c + 1)])
        out.select(axis, k).copy_(net.body(x[:, 0].index_select(axis - 1, idx).movedim(axis - 1, 1)))
    return out


def test_plane_network_averages_its_x_z_and_y_z_residuals():
    """A volume goes through the 2D body plane by plane (in chunks) along both in-plane axes; the residuals are
    averaged. Checked against a plain loop, on a non-square volume so that swapped axes would show."""
    torch.manual_seed(0)
    net = PlaneResidualNet(channels=6, layers=4, context=2, chunk=7).eval()
    x = torch.randn(2, 1, 13, 10, 6)
    with torch.no_grad():
        expected = x + 0.5 * (_plane_reference(net, x, 3) + _plane_reference(net, x, 2))
        torch.testing.assert_close(net(x), expected)


def test_three_view_network_adds_the_axial_residual_and_starts_from_two_view_weights():
    """``axial=True``: the x-y planes (neighbouring slices as channels) go through the second CNN and the three
    residuals are averaged; weights of a two-view network load with the axial CNN a copy of the first; a plane
    batch sends its last ``axial`` planes to the axial CNN."""
    torch.manual_seed(0)
    two = PlaneResidualNet(channels=6, layers=4, context=2, chunk=7).eval()
    three = PlaneResidualNet(channels=6, layers=4, context=2, chunk=7, axial=True).eval()
    three.load_state_dict(two.state_dict())
    for (k, a), b in zip(three.axial_body.state_dict().items(), three.body.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    with torch.no_grad():
        for p in three.axial_body.parameters():  # a different axial CNN, so that a swapped body would show
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(2, 1, 13, 10, 6)
        through = _plane_reference(three, x, 3) + _plane_reference(three, x, 2)
        axial = torch.zeros_like(x)
        for k in range(6):
            idx = torch.tensor([min(max(j, 0), 5) for j in range(k - 2, k + 3)])
            axial[..., k] = three.axial_body(x[:, 0].index_select(3, idx).movedim(3, 1))
        torch.testing.assert_close(three(x), x + (through + axial) / 3)
        torch.testing.assert_close(torch.jit.script(three)(x), three(x))  # export (ckpt_export) scripts it
        planes = torch.randn(5, 5, 8, 6)
        out = three(planes, axial=2)
        torch.testing.assert_close(out[:3], planes[:3, 2:3] + three.body(planes[:3]))
        torch.testing.assert_close(out[3:], planes[3:, 2:3] + three.axial_body(planes[3:]))
    with pytest.raises(ValueError, match="axial"):
        two(planes, axial=2)


def test_axial_windows_cut_slices_with_their_neighbours():
    """Axial training windows: the centre channel is the condition's slice at the target's position, its
    neighbours the adjacent slices (edges replicated), cropped to the through-plane planes' shape."""
    torch.manual_seed(0)
    cond = torch.arange(2 * 12 * 12 * 5, dtype=torch.float32).reshape(2, 1, 12, 12, 5)
    windows, target = axial_windows(cond, cond + 0.5, per_volume=6, context=1, size=(12, 5))
    assert windows.shape == (12, 3, 12, 5) and target.shape == (12, 1, 12, 5)
    torch.testing.assert_close(windows[:, 1:2] + 0.5, target)
    step = (windows[:, 2] - windows[:, 1]).flatten(1)[:, 0]  # 1 across z, 0 at a replicated edge
    assert set(step.unique().tolist()) <= {0.0, 1.0} and 1.0 in step.tolist()


def test_plane_pairs_cut_planes_with_their_neighbours():
    """Training planes: the centre channel is the condition's plane at the target's position, its neighbours the
    adjacent planes (edges replicated), from both axes."""
    torch.manual_seed(0)
    cond = torch.arange(2 * 8 * 8 * 5, dtype=torch.float32).reshape(2, 1, 8, 8, 5)
    planes, target = plane_pairs(cond, cond + 0.5, per_axis=6, context=1)
    assert planes.shape == (24, 3, 8, 5) and target.shape == (24, 1, 8, 5)
    torch.testing.assert_close(planes[:, 1:2] + 0.5, target)
    step = (planes[:, 2] - planes[:, 1]).flatten(1)[:, 0]  # 40 across x, 5 across y, 0 at a replicated edge
    assert set(step.unique().tolist()) <= {0.0, 5.0, 40.0} and {5.0, 40.0} <= set(step.unique().tolist())


def test_each_restoration_network_loads_its_own_weights(tmp_path):
    """The MR denoiser and the MR k-space network are two networks: loading one file must not overwrite the other
    (one shared config instance did, in a first 0.17.0 results run)."""
    from scripts.enhance import inference_parser

    tiny = ConfigParser.load_config_file(ROOT / "configs" / "tiny.json")["restoration_def"]
    weights = {}
    for name in ("restoration_mr", "restoration_mr_kspace"):
        weights[name] = ConfigParser({"net": tiny}).get_parsed_content("net").state_dict()
        torch.save(weights[name], tmp_path / f"{name}.pt")
    sr = ConfigParser.load_config_file(ROOT / "configs" / "tiny.json")["regression_def"]
    torch.save(ConfigParser({"net": sr}).get_parsed_content("net").state_dict(), tmp_path / "model.pt")
    parser = inference_parser(["configs/inference.json", "configs/tiny.json"], ckpt_dir=str(tmp_path), device="cpu")
    restoration = parser.get_parsed_content("networks")["restoration"]
    assert restoration["mr"] is not restoration["mr_kspace"] and restoration["ct"] is None
    for key, name in (("mr", "restoration_mr"), ("mr_kspace", "restoration_mr_kspace")):
        torch.testing.assert_close(restoration[key].state_dict(), weights[name])


def test_unet_planes_keep_any_shape_and_start_as_the_identity():
    """``widths``: each view's CNN is a ``PlaneUNet``; planes of any size (here not a multiple of 4) come back
    in their shape, an output pixel depends on input 20 pixels away (the plain 12-layer stack reaches 12),
    ``identity_start`` makes the volume network the identity, and it scripts for export."""
    torch.manual_seed(0)
    unet = PlaneUNet(5, (4, 8, 8)).eval()
    planes = torch.randn(3, 5, 30, 7, requires_grad=True)
    out = unet(planes)
    assert out.shape == (3, 1, 30, 7)
    out[0, 0, 0, 0].backward()
    assert planes.grad[0, :, 20].abs().sum() > 0 and planes.grad[1].abs().sum() == 0
    net = PlaneResidualNet(context=2, axial=True, widths=(4, 8, 8)).eval()
    assert isinstance(net.body, PlaneUNet) and isinstance(net.axial_body, PlaneUNet)
    x = torch.randn(1, 1, 11, 9, 6)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x))
        torch.testing.assert_close(identity_start(net, 0.0)(x), x)


def test_the_main_job_runs_a_plane_network_once_over_the_whole_volume():
    """``configs/inference.json``'s ``inferer`` (roi_size -1: the volume's extent) runs the regression stage in one
    pass, as the network over the whole volume gives, with channels-last weights for bfloat16 on a CPU; a window
    smaller than the volume still tiles it."""
    from scripts.enhance import regress

    inferer = ConfigParser.load_config_file(ROOT / "configs" / "inference.json")["inferer"]
    inferer = ConfigParser({"inferer": inferer}).get_parsed_content("inferer")
    torch.manual_seed(0)
    net = PlaneResidualNet(channels=8, layers=3, context=1, axial=True).eval()
    calls = []
    net.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(1, 1, 24, 20, 40)  # deeper than the former default window (256x256x32)
    out = regress(net, x, {}, torch.device("cpu"), amp=True, inferer=inferer)
    assert len(calls) == 1
    assert net.body.first_weight().is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = net(x).float()
    torch.testing.assert_close(out, whole, atol=0.02, rtol=0)
    tiled = regress(net, x, {"roi_size": [12, 10, 40], "overlap": 0.25}, torch.device("cpu"), amp=False)
    assert len(calls) > 2 and tiled.shape == x.shape
