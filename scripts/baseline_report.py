"""Classical-baseline numbers on real volumes: the figures quoted in docs/README.md come from here.

For each task the clean volume is degraded with a fixed seed, restored by every baseline, written to
``output_dir/<task>/`` and scored with ``scripts.evaluate``; ``baselines.md`` gathers the table.
Gaussian filtering and NLM (``h = factor * sigma``, sigma estimated from the degraded input) are reported at the
sigma or factor that scores best against the reference: an oracle choice that favours the baselines. BM4D (when
the optional ``bm4d`` package is installed, ``make install-bm4d``) runs once, at the estimated noise level: it is
too slow here to tune (``BM4D_SIGMA_FACTORS``).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from scripts.baselines import bm4d_available, bm4d_denoise, gaussian_denoise, nlm_denoise, resample
from scripts.degradations import blur, kspace_truncate, lowdose_ct, rician_noise, thick_slice, thick_slice_affine
from scripts.evaluate import evaluate
from scripts.metrics import body_mask, mr_scale
from scripts.volumes import load_volume, save_volume, spacing_of

GAUSSIAN_SIGMAS_MM = (0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
NLM_H_FACTORS = (0.6, 0.8, 1.0, 1.2)
# BM4D is too slow on this CPU to tune (`make bench` times it): one run at the estimated noise level
BM4D_SIGMA_FACTORS = (1.0,)

TASKS = {
    "ct_sr_5to10mm": {
        "file": "lung1_image.nrrd",
        "modality": "ct",
        "degradation": "thick slices x2 (5 -> 10 mm), box profile",
    },
    "ct_lowdose_quarter": {
        "file": "lung1_image.nrrd",
        "modality": "ct",
        "degradation": "quarter dose (5e5 photons/ray at full dose, 360 views)",
    },
    "mr_brain1_rician5": {
        "file": "brain1_image.nrrd",
        "modality": "mr",
        "degradation": "Rician noise, sigma 5% of the 99th percentile",
    },
    "mr_mni152_rician5": {
        "file": "mni152_t1_1mm.nii.gz",
        "modality": "mr",
        "degradation": "Rician noise, sigma 5% of the 99th percentile",
    },
}


def sr_factor(task: str) -> float | None:
    """The through-plane factor of a super-resolution task named ``<modality>_sr_<A>to<B>mm`` (B / A, e.g. 2 for
    ct_sr_5to10mm, 8 for mr_sr_1to8mm); ``None`` for any other task."""
    match = re.search(r"_sr_(\d+(?:\.\d+)?)to(\d+(?:\.\d+)?)mm$", task)
    return float(match[2]) / float(match[1]) if match else None


def degrade_for_task(task: str, x: torch.Tensor, affine: np.ndarray, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """The degraded volume and its affine for ``task`` (a key of ``TASKS``, or of ``scripts.results.TASKS``), with
    a fixed seed: thick slices with a box profile along the third axis (super-resolution), quarter-dose CT, Gaussian
    blur, k-space truncation (``_kspace<F>``: the central 1/F of k-space in-plane), or Rician noise of N % of the
    99th percentile (``_rician<N>``)."""
    gen = torch.Generator().manual_seed(seed)
    factor = sr_factor(task)
    if factor is not None:
        return (thick_slice(x, factor, axis=2, profile="box"), thick_slice_affine(affine, x.shape[-1], factor, axis=2))
    if task.startswith("ct_lowdose"):
        return lowdose_ct(x, spacing_of(affine), dose_fraction=0.25, generator=gen), affine
    if "_blur_gaussian_" in task:  # e.g. ct_blur_gaussian_3mm: Gaussian sigma in mm
        return blur(x, float(task.rsplit("_", 1)[1].removesuffix("mm")), spacing_of(affine), "gaussian"), affine
    if "_kspace" in task:
        return kspace_truncate(x, float(task.rsplit("_kspace", 1)[1])), affine
    match = re.search(r"_rician(\d+(?:\.\d+)?)$", task)
    if not match:
        raise ValueError(f"unknown task {task!r}")
    sigma = float(match[1]) / 100 * float(torch.quantile(x.flatten()[::7].float(), 0.99))
    return rician_noise(x, sigma, gen), affine


def restore_all(task: str, y: torch.Tensor, y_aff: np.ndarray, target_spacing: np.ndarray) -> dict[str, tuple]:
    """Every baseline's output for the degraded ``y``, with the seconds it took."""
    out = {}
    if sr_factor(task) is not None:
        for method in ("trilinear", "bspline"):
            t0 = time.perf_counter()
            v, _ = resample(y, y_aff, target_spacing, method)
            out[method] = (v, time.perf_counter() - t0)
        return out
    out["degraded input"] = (y, 0.0)
    if "_blur_" in task or "_kspace" in task:  # no classical deblurring baseline: the input is the reference point
        return out
    for s in GAUSSIAN_SIGMAS_MM:
        t0 = time.perf_counter()
        out[f"gaussian {s} mm"] = (gaussian_denoise(y, y_aff, s), time.perf_counter() - t0)
    for h in NLM_H_FACTORS:
        t0 = time.perf_counter()
        out[f"nlm h={h}"] = (nlm_denoise(y, h_factor=h), time.perf_counter() - t0)
    for f in BM4D_SIGMA_FACTORS if bm4d_available() else ():
        t0 = time.perf_counter()
        out[f"bm4d sigma x{f}"] = (bm4d_denoise(y, sigma_factor=f), time.perf_counter() - t0)
    return out


def tuned_best(means: dict[str, dict]) -> list[str]:
    """The methods of a report to show: each tuned family (Gaussian sigmas, NLM and BM4D factors) by its best
    PSNR."""
    families = ("gaussian", "nlm", "bm4d")
    keep = [m for m in means if not m.startswith(families)]
    for family in families:
        tuned = [m for m in means if m.startswith(family)]
        if tuned:
            keep.append(max(tuned, key=lambda m: means[m]["psnr"]))
    return keep


def run(data_dir: str, output_dir: str, seed: int = 0) -> dict:
    """Run every task on the volumes in ``data_dir``; write volumes, reports and ``baselines.md``."""
    out_root = Path(output_dir)
    lines = [
        "| task | degradation | method | PSNR (dB) | SSIM | MAE | HU-MAE body | seconds (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = {}
    for task, spec in TASKS.items():
        ref = load_volume(Path(data_dir) / spec["file"])
        affine, x = np.asarray(ref.affine), ref.as_tensor()[0].double()
        y, y_aff = degrade_for_task(task, x, affine, seed)
        task_dir = out_root / task
        save_volume(x, affine, task_dir / "reference.nii.gz")
        save_volume(y, y_aff, task_dir / "degraded.nii.gz")
        restored = restore_all(task, y, y_aff, spacing_of(affine))
        cases, seconds = [], {}
        for method, (vol, sec) in restored.items():
            path = task_dir / f"{method.replace(' ', '_')}.nii.gz"
            save_volume(vol, affine, path)
            seconds[method] = sec
            cases.append(
                {
                    "name": method.replace(" ", "_"),
                    "method": method,
                    "output": str(path),
                    "reference": str(task_dir / "reference.nii.gz"),
                    "input": str(task_dir / "degraded.nii.gz"),
                }
            )
        report = evaluate(cases, str(task_dir), spec["modality"])
        means = report["mean_by_method"]
        for m in tuned_best(means):
            r = means[m]
            hu = f"{r['hu_mae_body']:.1f}" if "hu_mae_body" in r else "-"
            mae_txt = f"{r['mae']:.1f} HU" if spec["modality"] == "ct" else f"{r['mae']:.4f}"
            lines.append(
                f"| {task} | {spec['degradation']} | {m} | {r['psnr']:.2f} | {r['ssim']:.4f} | {mae_txt} | "
                f"{hu} | {seconds[m]:.1f} |"
            )
        summary[task] = {
            "file": spec["file"],
            "shape": list(x.shape),
            "spacing": spacing_of(affine).tolist(),
            "metrics": means,
            "seconds": seconds,
        }
        if task.startswith("ct_lowdose"):
            summary[task]["added_noise_std_body_hu"] = float((y - x)[torch.as_tensor(body_mask(x))].std())
        if spec["modality"] == "mr":
            summary[task]["mr_scale"] = mr_scale(x)
    (out_root / "baselines.md").write_text("\n".join(lines) + "\n")
    (out_root / "baselines.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
    return summary
