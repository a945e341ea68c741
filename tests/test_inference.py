"""The main job (configs/inference.json): the public command-line contract on a real crop, with tiny networks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.enhance import depth_to_space, inference_parser, run, space_to_depth
from scripts.grid import fov_grid
from tests.conftest import LATENT, ROOT, assert_user_error, monai_bundle, torchrun


def networks(ckpt: Path) -> dict:
    return inference_parser(LATENT, ckpt_dir=str(ckpt), device="cpu").get_parsed_content("networks")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_space_to_depth_round_trip():
    x = torch.rand(1, 1, 8, 6, 4)
    y = space_to_depth(x, 2)
    assert y.shape == (1, 8, 4, 3, 2)
    torch.testing.assert_close(depth_to_space(y, 2), x)
    torch.testing.assert_close(y[0, :, 1, 2, 0], x[0, 0, 2:4, 4:6, 0:2].flatten())


def test_super_resolution_contract(crops, weights, tmp_path):
    src = crops / "c.nii.gz"
    before = sha(src)
    nets = networks(weights)
    out = tmp_path / "sr.nii.gz"
    res = run(
        str(src),
        str(out),
        networks=nets,
        target_spacing="[1.1406, 1.1406, 2.5]",
        num_inference_steps=2,
        seed=3,
        sliding_window={"roi_size": [32, 32, 16], "overlap": 0.25},
    )
    assert sha(src) == before  # the input is never modified
    img, ref = nib.load(out), nib.load(src)
    shape, affine, _ = fov_grid(ref.shape, ref.affine, [1.1406, 1.1406, 2.5])
    assert img.shape == shape == (64, 64, 32)  # 5 mm -> 2.5 mm: each input slice maps onto exactly 2
    np.testing.assert_allclose(img.affine, affine, atol=1e-3)
    assert img.get_data_dtype() == np.int16 and res["modality"] == "ct"
    # same orientation and field of view: the first output slice's low edge is the input's low edge
    np.testing.assert_allclose((img.affine @ [0, 0, -0.5, 1])[:3], (ref.affine @ [0, 0, -0.5, 1])[:3], atol=1e-3)
    again = tmp_path / "again.nii.gz"
    run(
        str(src),
        str(again),
        networks=nets,
        target_spacing=[1.1406, 1.1406, 2.5],
        num_inference_steps=2,
        seed=3,
        sliding_window={"roi_size": [32, 32, 16], "overlap": 0.25},
        consistency="false",
    )  # as `--x false` arrives
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(nib.load(again).dataobj))  # seeded
    other = tmp_path / "other.nii.gz"
    run(
        str(src),
        str(other),
        networks=nets,
        target_spacing=[1.1406, 1.1406, 2.5],
        num_inference_steps=2,
        seed=4,
        sliding_window={"roi_size": [32, 32, 16], "overlap": 0.25},
    )
    assert not np.array_equal(np.asarray(img.dataobj), np.asarray(nib.load(other).dataobj))


def test_denoising_keeps_the_grid_and_writes_uncertainty(crops, weights, tmp_path):
    src = crops / "a.nii.gz"
    out = tmp_path / "dn.nii.gz"
    res = run(
        str(src),
        str(out),
        networks=networks(weights),
        num_inference_steps=1,
        num_samples=2,
        sliding_window={"roi_size": [32, 32, 16], "overlap": 0.25},
    )
    img, ref = nib.load(out), nib.load(src)
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    std = nib.load(res["std"])
    assert std.shape == ref.shape and float(np.asarray(std.dataobj).max()) > 0


def test_batch_mode_output_feeds_auto3dseg(crops, weights, tmp_path):
    """Batch mode keeps entries, folds and labels and points images at the enhanced volumes; Auto3DSeg's
    DataAnalyzer accepts the datalist it writes (images and labels on the same grid)."""
    from monai.apps.auto3dseg import DataAnalyzer

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        img = nib.load(crops / f"{name}.nii.gz")
        nib.save(img, data / f"{name}.nii.gz")
        body = (np.asarray(img.dataobj) > -300).astype(np.uint8)
        nib.save(nib.Nifti1Image(body, img.affine), data / f"{name}_label.nii.gz")
    (data / "sub").mkdir()
    shutil.copy(crops / "c.nii.gz", data / "sub" / "a.nii.gz")  # same file name in another folder
    dl = {
        "name": "chest",
        "dataroot": str(data),
        "training": [
            {"image": "a.nii.gz", "label": "a_label.nii.gz", "fold": 0},
            {"image": "b.nii.gz", "label": "b_label.nii.gz", "fold": 1},
        ],
        "testing": [{"image": "sub/a.nii.gz"}],
    }
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    target = run(
        datalist=str(tmp_path / "dl.json"),
        output_dir=str(tmp_path / "out"),
        networks=networks(weights),
        num_inference_steps=1,
        sliding_window={"roi_size": [32, 32, 16], "overlap": 0.25},
    )
    new = json.loads(Path(target).read_text())
    assert new["name"] == "chest" and Path(new["dataroot"]) == tmp_path / "out"
    assert new["training"] == [
        {"image": "a_enhanced.nii.gz", "label": str(data / "a_label.nii.gz"), "fold": 0},
        {"image": "b_enhanced.nii.gz", "label": str(data / "b_label.nii.gz"), "fold": 1},
    ]
    assert new["testing"] == [{"image": "a_1_enhanced.nii.gz"}]  # no clash with training's a.nii.gz
    for entry in new["training"] + new["testing"]:
        assert (tmp_path / "out" / entry["image"]).is_file()
    stats = DataAnalyzer(
        target, new["dataroot"], output_path=str(tmp_path / "stats.yaml"), device="cpu", worker=0, label_key="label"
    ).get_all_case_stats()
    cases = stats["stats_by_cases"]
    assert len(cases) == 2
    assert all(c["image_stats"]["shape"][0] == [64, 64, 16] for c in cases)


def test_dicom_series_in_dicom_series_out(crops, weights, tmp_path):
    """A DICOM input enhanced onto a finer grid comes back as a derived series that reads back to the NIfTI
    output's volume and affine, with the source's patient and study, new UIDs and exact HU."""
    import pydicom
    from scripts.dicom import new_template, read_series, write_series

    src_img = nib.load(crops / "c.nii.gz")
    template = new_template("CT")
    template.PatientName, template.PatientID = "Test^Patient", "P123"
    write_series(np.asarray(src_img.dataobj), src_img.affine, template, tmp_path / "in")
    before = {p.name: sha(p) for p in (tmp_path / "in").iterdir()}
    out, dcm_out = tmp_path / "sr.nii.gz", tmp_path / "sr_dicom"
    run(
        str(tmp_path / "in"),
        str(out),
        networks=networks(weights),
        target_spacing=[1.1406, 1.1406, 2.5],
        num_inference_steps=1,
        sliding_window={"roi_size": [32, 32, 16], "overlap": 0.25},
        output_dicom=str(dcm_out),
    )
    assert {p.name: sha(p) for p in (tmp_path / "in").iterdir()} == before
    nifti, back = nib.load(out), read_series(dcm_out)
    np.testing.assert_array_equal(back[0].numpy(), np.asarray(nifti.dataobj).astype(np.float32))
    np.testing.assert_allclose(np.asarray(back.affine), nifti.affine, atol=1e-4)
    files = sorted(dcm_out.iterdir())
    assert len(files) == 32
    ds, source = pydicom.dcmread(files[0]), pydicom.dcmread(next((tmp_path / "in").iterdir()))
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert (ds.PatientName, ds.PatientID, ds.StudyInstanceUID) == ("Test^Patient", "P123", source.StudyInstanceUID)
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == 32
    assert float(ds.SliceThickness) == pytest.approx(2.5) and float(ds.RescaleSlope) == 1.0
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([1.1406, 1.1406], abs=1e-3)
    with pytest.raises(FileExistsError, match="not empty"):  # never overwrites a series
        run(
            str(tmp_path / "in"),
            str(tmp_path / "again.nii.gz"),
            networks=networks(weights),
            num_inference_steps=1,
            sliding_window={"roi_size": [32, 32, 16], "overlap": 0.25},
            output_dicom=str(dcm_out),
        )
    assert not (tmp_path / "again.nii.gz").exists()


def bundle(*args: str) -> subprocess.CompletedProcess:
    return monai_bundle(str(LATENT), *args)


def test_main_job_runs_from_any_directory_as_the_zoo_runs_it(crops, tmp_path):
    """The model zoo runs a bundle from its own root with configs/inference.json alone: the default method (the
    regression stage) with the shipped weights in models/, no file named relative to the working directory
    (everything comes from bundle_root), and every property of MONAI's inference workflow (dataset, evaluator,
    inferer, network_def, ...). --dataset_dir is the folder of a relative --input_image."""
    from monai.bundle import ConfigWorkflow

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(crops / "c.nii.gz", tmp_path / "c.nii.gz")
    files = [str(ROOT / "configs" / "inference.json")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files), "--bundle_root", str(ROOT)]
    args = ["--dataset_dir", str(tmp_path), "--input_image", "c.nii.gz", "--output_image", str(tmp_path / "o.nii.gz")]
    args += ["--target_spacing", "[1.1406, 1.1406, 2.5]", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd + args, cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert nib.load(tmp_path / "o.nii.gz").shape == (64, 64, 32)  # 5 mm -> 2.5 mm by the shipped SR network
    assert not list(elsewhere.iterdir())  # nothing written to the working directory

    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        workflow = ConfigWorkflow(
            config_file=files,
            meta_file=str(ROOT / "configs" / "metadata.json"),
            workflow_type="infer",
            bundle_root=str(ROOT),
            device="cpu",
        )
        workflow.initialize()
        assert workflow.check_properties() == []
        assert workflow.evaluator.data_loader.dataset[0]["input_image"] == ""  # no volume given: nothing runs
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("problem", ["missing_input", "bad_spacing", "missing_weights"])
def test_bad_input_gives_a_clear_error_and_no_output(crops, weights, tmp_path, problem):
    ckpt = tmp_path / "models"
    shutil.copytree(weights, ckpt)
    src, spacing = str(crops / "c.nii.gz"), "[1, 1, 2]"
    expected = {
        "missing_input": "nope.nii.gz: no such file",
        "bad_spacing": "--target_spacing: must be three positive numbers",
        "missing_weights": "controlnet.pt: no weights",
    }[problem]
    if problem == "missing_input":
        src = str(tmp_path / "nope.nii.gz")
    elif problem == "bad_spacing":
        spacing = "[1, 0, 2]"
    else:
        (ckpt / "controlnet.pt").unlink()
    out = tmp_path / "out.nii.gz"
    res = bundle(
        "--input_image",
        src,
        "--output_image",
        str(out),
        "--ckpt_dir",
        str(ckpt),
        "--target_spacing",
        spacing,
        "--num_inference_steps",
        "1",
        "--device",
        "cpu",
    )
    assert_user_error(res, expected)
    assert not out.exists() and not list(tmp_path.glob("*.nii*"))


def test_windowed_latent_denoising_step_has_no_seams():
    """One noise prediction of the prior + ControlNet, window by window over a latent larger than a window, against
    the whole latent: with the sampling defaults (overlap 0.5, halo 4) the error next to window borders is not
    larger than elsewhere; with overlap 0.25 and no halo it is, so the check can fail."""
    from scripts.bench import seam_ratio

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert seam_ratio(0.5, 4) <= 1.2
        assert seam_ratio(0.25, 0) > 1.3
    finally:
        os.chdir(cwd)


def test_data_consistency_makes_the_re_degraded_output_match_the_input(crops, weights, tmp_path):
    from scripts.enhance import data_consistency, slab_matrix
    from scripts.grid import apply_along_axis

    src = crops / "c.nii.gz"
    out = tmp_path / "dc.nii.gz"
    run(
        str(src),
        str(out),
        networks=networks(weights),
        target_spacing=[1.1406, 1.1406, 2.5],
        num_inference_steps=1,
        consistency=True,
        sliding_window={"roi_size": [32, 32, 16], "overlap": 0.25},
    )
    x = torch.as_tensor(np.asarray(nib.load(out).dataobj), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(nib.load(src).dataobj), dtype=torch.float64)
    redegraded = apply_along_axis(x, slab_matrix(16, 32), 2)
    # exact up to int16 rounding, wherever the physical-range clip (-1024 HU) left both slices of a slab alone
    clipped = apply_along_axis(((x <= -1024) | (x >= 3071)).double(), slab_matrix(16, 32), 2) > 0
    assert (~clipped).float().mean() > 0.5
    assert (redegraded - y)[~clipped].abs().max() <= 0.5 + 1e-6
    # slab_matrix for an integer factor is the mean of the covered slices
    np.testing.assert_allclose(slab_matrix(2, 4), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    # on the input's grid (denoising) there is no slab to match: the output stays, not the noisy input
    restored = torch.rand(1, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(data_consistency(restored, torch.zeros(1, 8, 8, 4)), restored)


def test_a_deeper_prior_runs_on_a_latent_thinner_than_its_downsampling(weights):
    """A prior with three levels needs latent windows divisible by 4: a volume whose latent is 3 voxels deep (and
    windows clipped at its edges) is padded for it, in the main job and in posterior sampling; this crashed in
    the UNet's skip connections before. Both kinds of ControlNet condition: the encoded input (the bundle's) and
    the image folded onto the latent grid."""
    from monai.data import MetaTensor
    from monai.networks.nets import ControlNet, DiffusionModelUNet
    from scripts.enhance import enhance_volume
    from scripts.posterior import posterior_sample

    torch.manual_seed(0)
    levels = {
        "spatial_dims": 3,
        "in_channels": 2,
        "channels": [4, 8, 8],
        "attention_levels": [False] * 3,
        "num_res_blocks": 1,
        "norm_num_groups": 4,
    }
    nets = networks(weights)
    nets["diffusion"] = DiffusionModelUNet(out_channels=2, **levels).eval()
    image = MetaTensor(torch.rand(1, 20, 36, 6) * 1000 - 500, affine=torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0])))
    window = {"roi_size": [16, 16, 8], "overlap": 0.25, "sampling_overlap": 0.5}
    for encoded, channels in ((True, [2, [4]]), (False, [1, [4, 4]])):
        embedding = dict(zip(("conditioning_embedding_in_channels", "conditioning_embedding_num_channels"), channels))
        nets["controlnet"] = ControlNet(**embedding, **levels).eval()
        nets["encode_condition"] = encoded
        out, _, affine, _ = enhance_volume(
            image, nets, modality="ct", num_inference_steps=2, sliding_window=window, progress=False
        )
        assert out.shape == (1, 20, 36, 6) and torch.isfinite(out).all()
    x = posterior_sample(
        nets["autoencoder"],
        nets["diffusion"],
        nets["scheduler"],
        1.0,
        torch.zeros(1, 1, 20, 36, 6),
        lambda v: v,
        (20, 36, 6),
        0.1,
        2,
        torch.Generator().manual_seed(0),
        roi_size=[8, 8, 4],
        progress=False,
    )
    assert x.shape == (1, 1, 20, 36, 6)


def test_strength_starts_from_the_noised_encoded_input_and_runs_only_the_last_steps():
    """SDEdit start: with ``strength`` 0.1 of 20 steps, 2 steps run from the condition's latent noised to the
    first of them, and the sample stays near it; at strength 1 all 20 run from pure noise."""
    from monai.bundle import ConfigParser
    from scripts.enhance import sample_latent

    scheduler = ConfigParser(json.loads((ROOT / "configs" / "inference.json").read_text())).get_parsed_content(
        "inference_scheduler_def"
    )
    cond = torch.randn(1, 2, 8, 8, 4, generator=torch.Generator().manual_seed(1))
    seen: list[int] = []

    def denoiser(z: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        seen.append(int(t))
        return torch.zeros_like(z)  # a prior that predicts no noise: the sample follows its start

    dist = {}
    for strength in (0.1, 1.0):
        seen.clear()
        z = sample_latent(
            denoiser,
            scheduler,
            cond,
            2,
            1,
            20,
            torch.Generator().manual_seed(0),
            [8, 8, 4],
            progress=False,
            strength=strength,
        )
        dist[strength] = float((z - cond).norm() / cond.norm())
        assert len(seen) == round(20 * strength)
    assert dist[0.1] < 0.5 and dist[1.0] > 10 * dist[0.1]
    with pytest.raises(ValueError, match="encode_condition"):
        sample_latent(
            denoiser,
            scheduler,
            torch.rand(1, 1, 16, 16, 8),
            2,
            2,
            20,
            torch.Generator(),
            [8, 8, 4],
            progress=False,
            strength=0.5,
        )
    seen.clear()  # an image-conditioned ControlNet starts from the encoded input given as ``start``
    z = sample_latent(
        denoiser,
        scheduler,
        torch.rand(1, 1, 16, 16, 8),
        2,
        2,
        20,
        torch.Generator().manual_seed(0),
        [8, 8, 4],
        progress=False,
        strength=0.1,
        start=cond,
    )
    assert len(seen) == 2 and float((z - cond).norm() / cond.norm()) == pytest.approx(dist[0.1])


@pytest.mark.parametrize("roi,strength", [((16, 16, 8), 1.0), ((6, 10, 4), 1.0), ((6, 10, 4), 0.4)])
def test_sampling_with_an_oracle_denoiser_returns_the_clean_latent(roi, strength):
    """The sampling loop itself (DDIM steps, windows with halo and blending, SDEdit start): a denoiser that knows
    the clean latent (passed as the encoded condition, so each window sees its own part) predicts the exact
    noise, and deterministic DDIM must then end on that latent, with one window or many."""
    from monai.bundle import ConfigParser
    from scripts.enhance import sample_latent

    scheduler = ConfigParser(json.loads((ROOT / "configs" / "inference.json").read_text())).get_parsed_content(
        "inference_scheduler_def"
    )
    clean = torch.randn(1, 4, 16, 16, 8, generator=torch.Generator().manual_seed(0))

    def oracle(z: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        ab = scheduler.alphas_cumprod[int(t)]
        return (z - ab.sqrt() * condition) / (1 - ab).sqrt()

    z = sample_latent(
        oracle,
        scheduler,
        clean,
        4,
        1,
        10,
        torch.Generator().manual_seed(1),
        roi,
        overlap=0.5,
        halo=2,
        progress=False,
        unit=2,
        strength=strength,
    )
    torch.testing.assert_close(z, clean, atol=1e-4, rtol=1e-4)


class _OracleDenoiser(torch.nn.Module):
    """Predicts the exact noise toward the encoded condition it is given, so DDIM ends on the input's latent."""

    def __init__(self, scheduler) -> None:
        super().__init__()
        self.scheduler = scheduler

    def forward(self, z: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        ab = self.scheduler.alphas_cumprod[int(t)]
        return (z - ab.sqrt() * condition) / (1 - ab).sqrt()


def test_residual_decoding_keeps_what_the_autoencoder_loses():
    """When the sample is the input's own latent, plain decoding returns the autoencoder's reconstruction (here
    an untrained one: far from the input), and residual decoding ``c + D(z) - D(E(c))`` returns the input."""
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor
    from scripts.enhance import enhance_volume
    from tests.conftest import ct_phantom

    common = ConfigParser(json.loads((ROOT / "configs" / "inference.json").read_text()))
    tiny = ConfigParser(json.loads((ROOT / "configs" / "tiny.json").read_text()))
    torch.manual_seed(0)
    scheduler = common.get_parsed_content("inference_scheduler_def")
    nets = {
        "autoencoder": tiny.get_parsed_content("autoencoder_def"),
        "denoiser": _OracleDenoiser(scheduler),
        "scheduler": scheduler,
        "scale_factor": 0.7,
        "encode_condition": True,
        "latent_multiple": 1,
    }
    vol, affine = ct_phantom((32, 32, 16))
    image = MetaTensor(torch.as_tensor(vol, dtype=torch.float32)[None], affine=torch.as_tensor(affine))
    sw = {"roi_size": [16, 16, 8], "overlap": 0.25, "sampling_overlap": 0.5}
    out = {
        r: enhance_volume(
            image, nets, modality="ct", num_inference_steps=5, sliding_window=sw, progress=False, residual_decoding=r
        )[0]
        for r in (False, True)
    }
    x = image.as_tensor()
    assert (out[False] - x).abs().mean() > 100  # HU: the untrained decoder's reconstruction
    torch.testing.assert_close(out[True], x, atol=0.5, rtol=0)
    with pytest.raises(ValueError, match="residual"):
        enhance_volume(image, {}, method="regression", residual_decoding=True)


def test_batch_inference_shards_across_processes(crops, weights, tmp_path):
    """``configs/multi_gpu_inference.json`` under torchrun (2 CPU processes, gloo): every image is enhanced by
    exactly one rank, the outputs equal the single-process ones, and so does the datalist rank 0 writes."""
    import re

    dl = {"testing": [{"image": str(crops / f"{n}.nii.gz")} for n in ("a", "b", "c")]}
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    common = ["--datalist", str(tmp_path / "dl.json"), "--ckpt_dir", str(weights), "--num_inference_steps", "1"]
    single = bundle(*common, "--output_dir", str(tmp_path / "one"), "--device", "cpu")
    assert single.returncode == 0, single.stderr[-3000:]
    res = torchrun(
        str([*LATENT, "configs/multi_gpu_inference.json"]), *common, "--output_dir", str(tmp_path / "two"), run_id="run"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    written = re.findall(r"enhanced \S+ -> (\S+) in", res.stdout + res.stderr)
    assert sorted(Path(w).name for w in written) == [f"{n}_enhanced.nii.gz" for n in ("a", "b", "c")]
    one = json.loads((tmp_path / "one" / "datalist_enhanced.json").read_text())
    two = json.loads((tmp_path / "two" / "datalist_enhanced.json").read_text())
    assert {k: v for k, v in one.items() if k != "dataroot"} == {k: v for k, v in two.items() if k != "dataroot"}
    for entry in one["testing"]:
        a, b = nib.load(tmp_path / "one" / entry["image"]), nib.load(tmp_path / "two" / entry["image"])
        va, vb = np.asarray(a.dataobj).astype(int), np.asarray(b.dataobj).astype(int)
        # the processes run on one thread each, the reference on two: float sums in another order may round a
        # few voxels to the next HU
        assert np.abs(va - vb).max() <= 1 and (va != vb).mean() < 1e-3
        np.testing.assert_allclose(a.affine, b.affine)
