"""The results table: every method on held-out validation data, through the main job's own code paths."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch
from scripts.results import run


def test_results_table_runs_every_method_and_data_consistency_never_hurts(crops, weights, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"validation": [{"image": str(crops / "c.nii.gz"), "modality": "ct"}]}))
    out = tmp_path / "results"
    summary = run(
        str(datalist),
        str(weights),
        str(out),
        ["configs/tiny.json"],
        ["ct_sr_5to10mm", "ct_blur_gaussian_3mm"],
        num_inference_steps=2,
        num_samples=2,
        posterior_steps=2,
    )
    latent = {
        "autoencoder ceiling (oracle)",
        "autoencoder ceiling + data consistency (oracle)",
        "residual decoding ceiling (oracle)",
        "ours",
        "ours + residual decoding",
        "ours, strength 0.5",
        "ours, strength 0.5 + residual decoding",
        "ours mean of 2",
        "posterior (dps)",
        "posterior (dps) + data consistency",
        "posterior (dps), strength 0.5",
        "posterior (dps), strength 0.5 + data consistency",
    }
    expected = {
        "ct_sr_5to10mm": {
            "trilinear",
            "bspline",
            "trilinear + data consistency",
            "ours + data consistency",
            "ours, strength 0.5 + residual decoding + data consistency",
            *latent,
        },
        "ct_blur_gaussian_3mm": {"degraded input", "degraded input + data consistency", *latent},
    }
    table = (out / "results.md").read_text()
    for task, methods in expected.items():  # no regression.pt: skipped, not faked
        metrics = summary["cases"][f"c/{task}"]["metrics"]
        assert set(metrics) == methods
        assert all(np.isfinite(m["psnr"]) and m["psnr"] > 0 for m in metrics.values())
        assert table.count(f"| c | {task} |") == len(methods)
        assert (out / "c" / task / f"{task}.png").stat().st_size > 0
        # data consistency moves toward every volume that re-degrades to the input, the reference among them
        ref = nib.load(out / "c" / task / "reference.nii.gz").get_fdata()
        start = "trilinear" if task == "ct_sr_5to10mm" else "degraded_input"
        pairs = [
            (start, f"{start}_plus_data_consistency"),
            ("posterior_dps", "posterior_dps_plus_data_consistency"),
            ("autoencoder_ceiling_oracle", "autoencoder_ceiling_plus_data_consistency_oracle"),
        ]
        if task == "ct_sr_5to10mm":
            pairs.append(("ours", "ours_plus_data_consistency"))
        for before, after in pairs:
            err = [
                np.linalg.norm(nib.load(out / "c" / task / f"{m}.nii.gz").get_fdata() - ref) for m in (before, after)
            ]
            assert err[1] < err[0], (task, before)


def test_super_resolution_tasks_degrade_by_the_factor_of_their_operator():
    from scripts.baseline_report import degrade_for_task, sr_factor
    from scripts.results import TASKS

    x, affine = torch.rand(6, 5, 16, dtype=torch.float64), np.diag([0.5, 0.5, 1.0, 1.0])
    sr = [t for t, spec in TASKS.items() if spec["operator"]["operator"] == "thick_slice"]
    assert {"ct_sr_5to10mm", "mr_sr_1to8mm"} <= set(sr)
    for task in sr:
        factor = TASKS[task]["operator"]["factor"]
        assert sr_factor(task) == factor
        y, y_aff = degrade_for_task(task, x, affine, seed=0)
        assert y.shape == (6, 5, 16 // int(factor))
        assert np.isclose(y_aff[2, 2], factor) and np.isclose(y[..., 0].mean(), x[..., : int(factor)].mean())
    assert all(sr_factor(t) is None for t in TASKS if t not in sr)


def test_super_resolution_tasks_take_volumes_of_their_slice_thickness():
    from scripts.results import fits

    ct5, ct3, mr1 = (np.diag([0.6, 0.6, dz, 1.0]) for dz in (5.0, 3.27, 0.9))
    assert fits("ct_sr_5to10mm", ct5) and not fits("ct_sr_5to10mm", ct3)
    assert fits("ct_sr_3to6mm", ct3) and not fits("ct_sr_3to6mm", ct5)
    assert fits("mr_sr_1to4mm", mr1) and fits("ct_lowdose_quarter", ct3) and fits("mr_rician4", mr1)


def test_super_resolution_references_hold_whole_thick_slices():
    from scripts.results import usable_slices

    assert usable_slices("ct_sr_3to6mm", 53) == 52 and usable_slices("mr_sr_1to4mm", 190) == 188
    assert usable_slices("ct_sr_5to10mm", 48) == 48 and usable_slices("ct_lowdose_quarter", 53) == 53
