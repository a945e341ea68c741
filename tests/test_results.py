"""The results table: every method on held-out validation data, through the main job's own code paths."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from scripts.results import run


def test_results_table_runs_every_method_and_data_consistency_never_hurts(crops, weights, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"validation": [{"image": str(crops / "c.nii.gz"), "modality": "ct"}]}))
    out = tmp_path / "results"
    summary = run(str(datalist), str(weights), str(out), ["configs/tiny.json"], ["ct_sr_5to10mm"],
                  num_inference_steps=2, num_samples=2, posterior_steps=2)
    case = summary["cases"]["c/ct_sr_5to10mm"]
    assert set(case["metrics"]) == {"trilinear", "bspline", "trilinear + data consistency",
                                    "autoencoder ceiling (oracle)", "autoencoder ceiling + data consistency (oracle)",
                                    "ours",
                                    "ours + data consistency", "ours, strength 0.5", "ours mean of 2",
                                    "posterior (dps)"}  # no regression.pt: skipped, not faked
    assert all(np.isfinite(m["psnr"]) and m["psnr"] > 0 for m in case["metrics"].values())
    table = (out / "results.md").read_text()
    assert table.count("| c | ct_sr_5to10mm |") == 10
    assert (out / "c" / "ct_sr_5to10mm" / "ct_sr_5to10mm.png").stat().st_size > 0
    # the data-consistency projection is non-expansive towards a reference that re-degrades to the input
    task = out / "c" / "ct_sr_5to10mm"
    ref = nib.load(task / "reference.nii.gz").get_fdata()
    err = {m: np.linalg.norm(nib.load(task / f"{m}.nii.gz").get_fdata() - ref)
           for m in ("ours", "ours_plus_data_consistency", "autoencoder_ceiling_oracle",
                     "autoencoder_ceiling_plus_data_consistency_oracle", "trilinear",
                     "trilinear_plus_data_consistency")}
    assert err["ours_plus_data_consistency"] < err["ours"]
    assert err["autoencoder_ceiling_plus_data_consistency_oracle"] < err["autoencoder_ceiling_oracle"]
    assert err["trilinear_plus_data_consistency"] < err["trilinear"]
