"""The quick-start demo: classical baselines always, the main job's networks when their weights exist."""

import json

import nibabel as nib
import numpy as np
from scripts.demo import TASKS, run_demo

TINY = ("configs/inference.json", "configs/tiny.json")
WINDOW = {"roi_size": [32, 32, 16], "overlap": 0.25, "sampling_overlap": 0.5}


def test_demo_runs_ours_on_both_tasks_when_weights_exist(crops, weights, tmp_path, capsys):
    out = tmp_path / "demo"
    report = run_demo(
        str(crops / "c.nii.gz"),
        str(out),
        ckpt_dir=str(weights),
        network_configs=TINY,
        num_inference_steps=2,
        sliding_window=WINDOW,
        strength=0.5,
        residual_decoding=True,
        consistency=True,
    )  # the main job's defaults
    ref = nib.load(crops / "c.nii.gz")
    for task in TASKS:
        assert set(report[task]["ours"]["metrics"]) >= {"psnr", "ssim", "hu_mae_body"}
        ours = nib.load(out / f"{task}_ours.nii.gz")  # on the reference's grid, in HU
        assert ours.shape == ref.shape and ours.get_data_dtype() == np.int16
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)
        assert (out / f"{task}.png").stat().st_size > 0
    assert "CLASSICAL BASELINE ONLY" not in capsys.readouterr().out
    assert json.loads((out / "demo_report.json").read_text()).keys() == set(TASKS)


def test_demo_without_weights_says_it_is_the_classical_baseline(crops, tmp_path, capsys):
    report = run_demo(
        str(crops / "c.nii.gz"), str(tmp_path / "demo"), ckpt_dir=str(tmp_path / "no_weights"), network_configs=TINY
    )
    assert all("ours" not in methods for methods in report.values())
    assert {"trilinear", "bspline"} <= set(report["ct_sr_5to10mm"])
    assert "CLASSICAL BASELINE ONLY" in capsys.readouterr().out


def test_demo_runs_the_regression_stage_on_super_resolution_when_only_its_weights_exist(crops, tmp_path, capsys):
    import torch
    from monai.bundle import ConfigParser
    from tests.conftest import ROOT

    ckpt = tmp_path / "models"
    ckpt.mkdir()
    tiny = ConfigParser(json.loads((ROOT / "configs" / "tiny.json").read_text()))
    torch.save(tiny.get_parsed_content("regression_def").state_dict(), ckpt / "model.pt")
    out = tmp_path / "demo"
    report = run_demo(
        str(crops / "c.nii.gz"), str(out), ckpt_dir=str(ckpt), network_configs=TINY, sliding_window=WINDOW
    )
    printed = capsys.readouterr().out
    assert "regression" in report["ct_sr_5to10mm"]  # the SR specialist: not run on the same-grid task
    assert "regression" not in report["ct_lowdose_quarter"] and all("ours" not in m for m in report.values())
    assert "CLASSICAL BASELINE ONLY" not in printed and "regression stage" in printed
    assert nib.load(out / "ct_sr_5to10mm_regression.nii.gz").shape == nib.load(crops / "c.nii.gz").shape
    # with the same-grid specialist's weights the denoising task runs it too
    torch.save(tiny.get_parsed_content("regression_def").state_dict(), ckpt / "restoration_ct.pt")
    report = run_demo(
        str(crops / "c.nii.gz"), str(out), ckpt_dir=str(ckpt), network_configs=TINY, sliding_window=WINDOW
    )
    assert "regression" in report["ct_lowdose_quarter"] and "same-grid restoration for CT" in capsys.readouterr().out


def test_demo_runs_the_mr_task_on_an_mr_sample(tmp_path, capsys):
    """The committed MR sample: Rician-noise denoising, scored in the head mask (no HU)."""
    from tests.conftest import ROOT

    report = run_demo(
        None,
        str(tmp_path / "demo"),
        ckpt_dir=str(tmp_path / "no_weights"),
        network_configs=TINY,
        mr_sample=str(ROOT / "docs" / "samples" / "mr_child_brain_crop.nii.gz"),
    )
    assert list(report) == ["mr_rician4"]
    mr = report["mr_rician4"]
    assert "degraded input" in mr and "hu_mae_body" not in mr["degraded input"]["metrics"]
    best = max((m for m in mr if m != "degraded input"), key=lambda m: mr[m]["metrics"]["psnr"])
    assert mr[best]["metrics"]["psnr"] > mr["degraded input"]["metrics"]["psnr"]  # denoising helps
    assert (tmp_path / "demo" / "mr_rician4.png").stat().st_size > 0
    assert "MR sample:" in capsys.readouterr().out
