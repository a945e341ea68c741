"""The quick-start demo: degrade a small real CT sample and restore it with the classical baselines.

No trained networks ship yet, so this is explicitly the *classical baseline*: through-plane super-resolution
(5 mm -> 10 mm thick slices -> back to 5 mm) with trilinear and cubic B-spline interpolation, and quarter-dose
CT denoising with Gaussian filtering and non-local means. It prints the metrics, and writes the restored
volumes (NIfTI) and PNG montages.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from scripts.baselines import gaussian_denoise, nlm_denoise, resample
from scripts.degradations import lowdose_ct, thick_slice, thick_slice_affine
from scripts.figures import montage
from scripts.metrics import score
from scripts.volumes import load_volume, save_volume, spacing_of

logger = logging.getLogger(__name__)
GAUSSIAN_SIGMAS_MM = (0.4, 0.6, 0.8, 1.0)
WINDOW = (-1000.0, 600.0)


def _best(results: dict[str, dict]) -> str:
    return max(results, key=lambda k: results[k]["metrics"]["psnr"])


def run_demo(sample: str, output_dir: str, seed: int = 0, factor: int = 2, dose_fraction: float = 0.25) -> dict:
    """Run both demo tasks on ``sample`` (a CT in HU) and write everything to ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = load_volume(sample)
    affine = np.asarray(ref.affine)
    x = ref.as_tensor()
    sp = spacing_of(affine)
    report: dict[str, dict] = {}

    # super-resolution: thick slices along z, then interpolate back onto the original grid
    thick = thick_slice(x, factor, axis=2, profile="box")
    thick_aff = thick_slice_affine(affine, x.shape[-1], factor, axis=2)
    save_volume(thick, thick_aff, out / "sr_input_thick.nii.gz", dtype="int16")
    sr = {}
    for method in ("trilinear", "bspline"):
        t0 = time.perf_counter()
        y, y_aff = resample(thick, thick_aff, sp, method)
        sr[method] = {"volume": y, "seconds": time.perf_counter() - t0, "metrics": score(y, x, "ct")}
        assert np.allclose(y_aff, affine, atol=1e-4), "the FOV-preserving grid must come back to the original"
    best = _best(sr)
    save_volume(sr[best]["volume"], affine, out / f"sr_{best}.nii.gz", dtype="int16")
    up, _ = resample(thick, thick_aff, sp, "trilinear")
    montage({"thick input (trilinear)": up, best: sr[best]["volume"], "5 mm reference": x}, affine, out / "demo_sr.png", WINDOW,
            difference=(best, "5 mm reference"), title=f"SR {sp[2] * factor:g} mm -> {sp[2]:g} mm: classical baseline")
    report["sr"] = {k: {"metrics": v["metrics"], "seconds": v["seconds"]} for k, v in sr.items()}

    # low-dose denoising: projection-domain noise, then Gaussian (sigma picked on the reference) and NLM
    gen = torch.Generator().manual_seed(seed)
    noisy = lowdose_ct(x, sp, dose_fraction=dose_fraction, generator=gen)
    save_volume(noisy, affine, out / "denoise_input_lowdose.nii.gz", dtype="int16")
    dn = {"low-dose input": {"volume": noisy, "seconds": 0.0, "metrics": score(noisy, x, "ct")}}
    for s in GAUSSIAN_SIGMAS_MM:
        t0 = time.perf_counter()
        y = gaussian_denoise(noisy, affine, s)
        dn[f"gaussian {s} mm"] = {"volume": y, "seconds": time.perf_counter() - t0, "metrics": score(y, x, "ct")}
    t0 = time.perf_counter()
    y = nlm_denoise(noisy)
    dn["nlm"] = {"volume": y, "seconds": time.perf_counter() - t0, "metrics": score(y, x, "ct")}
    best_dn = _best({k: v for k, v in dn.items() if k != "low-dose input"})
    save_volume(dn[best_dn]["volume"], affine, out / f"denoise_{best_dn.replace(' ', '_')}.nii.gz", dtype="int16")
    montage({"low-dose input": noisy, best_dn: dn[best_dn]["volume"], "reference": x}, affine,
            out / "demo_denoise.png", WINDOW, difference=(best_dn, "reference"),
            title=f"{dose_fraction:g} dose CT denoising: classical baseline")
    report["denoise"] = {k: {"metrics": v["metrics"], "seconds": v["seconds"]} for k, v in dn.items()}

    lines = [
        "",
        "CLASSICAL BASELINE ONLY: no trained networks ship with the bundle yet; these are interpolation and",
        "denoising filters, the numbers any enhancement network has to beat.",
        f"sample: {sample}  grid {tuple(x.shape[-3:])}  spacing {sp.round(3).tolist()} mm",
        f"{'task':<9} {'method':<18} {'PSNR dB':>8} {'SSIM':>7} {'HU-MAE body':>12} {'seconds':>8}",
    ]
    for task, res in report.items():
        for method, r in res.items():
            m = r["metrics"]
            lines.append(f"{task:<9} {method:<18} {m['psnr']:8.2f} {m['ssim']:7.4f} {m['hu_mae_body']:12.2f} "
                         f"{r['seconds']:8.2f}")
    lines.append(f"best: sr={best}, denoise={best_dn}; outputs and montages in {out}/")
    print("\n".join(lines))
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    return report


def make_sample(lung1: str, output: str, first_slice: int = 12, n_slices: int = 24) -> str:
    """Build the committed demo sample from PyRadiomics' lung1 CT: 2x2 in-plane block average, 24 slices.

    The whole axial field of view is kept, because projection-domain noise depends on the whole cross-section.
    """
    img = load_volume(lung1)
    v = img.as_tensor()[0, :, :, first_slice:first_slice + n_slices]
    v = torch.nn.functional.avg_pool2d(v.permute(2, 0, 1)[:, None], 2)[:, 0].permute(1, 2, 0)
    aff = np.asarray(img.affine) @ np.diag([2.0, 2.0, 1.0, 1.0])
    aff[:3, 3] = (np.asarray(img.affine) @ np.array([0.5, 0.5, first_slice, 1.0]))[:3]
    return str(save_volume(v, aff, output, dtype="int16"))


if __name__ == "__main__":
    import fire

    fire.Fire({"run": lambda *a, **k: run_demo(*a, **k) and None, "make_sample": make_sample})
