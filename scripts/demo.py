"""The quick-start demo: degrade small real CT and MR samples and restore them.

Three tasks: through-plane super-resolution (5 mm -> 10 mm thick slices -> back to 5 mm) and quarter-dose
denoising of the CT sample, and Rician-noise denoising of the MR sample (when one is given). The classical
baselines always run (trilinear and cubic B-spline interpolation; Gaussian filtering and non-local means, each
tuned as in ``scripts.baseline_report``). When ``ckpt_dir`` holds trained weights, the main job's regression stage
(``model.pt`` for super-resolution, ``restoration_<modality>.pt`` for the same-grid tasks) and its latent diffusion
+ ControlNet (``configs/inference_diffusion.json``) run as well (each when its weights are there); without any the
demo says that it shows the *classical baseline* only. It prints the metrics and writes the
degraded inputs, the restorations (NIfTI) and PNG montages (input, best classical method, regression, ours,
reference).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from scripts.baseline_report import degrade_for_task, restore_all
from scripts.baselines import resample
from scripts.enhance import enhance_volume, output_dtype
from scripts.figures import montage
from scripts.metrics import score
from scripts.options import flag
from scripts.results import load_networks
from scripts.volumes import load_volume, save_volume, spacing_of

CT_WINDOW = (-1000.0, 600.0)
TASKS = {"ct_sr_5to10mm": "SR 10 mm -> 5 mm", "ct_lowdose_quarter": "quarter-dose denoising"}
MR_TASKS = {"mr_rician4": "MR Rician noise (4 %) denoising"}
MAE_KEY = {"ct": "hu_mae_body", "mr": "mae"}
MAE_COLUMN = {"ct": "HU-MAE body", "mr": "MAE head"}  # MR: normalised by the 99th percentile (scripts.metrics)


def run_demo(
    sample: str | None,
    output_dir: str,
    seed: int = 0,
    ckpt_dir: str = "models",
    network_configs: Sequence[str] = ("configs/inference.json",),
    num_inference_steps: int = 10,
    sliding_window: dict | None = None,
    strength: float = 1.0,
    residual_decoding: bool = False,
    consistency: bool = False,
    amp: bool = True,
    mr_sample: str | None = None,
) -> dict:
    """Run the CT tasks on ``sample`` (a CT in HU; none when empty), and the MR task on ``mr_sample`` when given,
    and write everything to ``output_dir``; the networks of ``network_configs`` with the weights in ``ckpt_dir`` run too
    when those weights exist, with the main job's ``strength``, ``residual_decoding`` and data ``consistency``
    (``configs/demo.json`` takes them from ``configs/inference.json``)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = [(task, title, "ct", sample) for task, title in TASKS.items() if sample]
    cases += [(task, title, "mr", mr_sample) for task, title in MR_TASKS.items() if mr_sample]
    regression = load_networks(network_configs, ckpt_dir, "cpu")
    # the latent method's override right after the main config, so that later size overrides still apply
    networks = load_networks(
        [network_configs[0], "configs/inference_diffusion.json", *network_configs[1:]], ckpt_dir, "cpu"
    )
    report: dict[str, dict] = {}
    lines = [""]
    if networks is None and regression is None:
        lines += [
            f"CLASSICAL BASELINE ONLY: no trained weights in {ckpt_dir}; these are interpolation and denoising",
            "filters (Gaussian sigma and NLM h tuned against the reference), the numbers a network must beat.",
        ]
    if regression is not None:
        same_grid = [m.upper() for m, net in regression["restoration"].items() if net is not None]
        lines += [
            f"regression: the regression stage (super-resolution; same-grid restoration for "
            f"{', '.join(same_grid) or 'no modality'}), weights from {ckpt_dir}, data consistency {flag(consistency)}"
        ]
    if networks is None and regression is not None:
        lines += [
            f"ours (latent diffusion + ControlNet): no weights in {ckpt_dir} yet; classical filters tuned "
            "against the reference"
        ]
    elif networks is not None:
        lines += [
            f"ours: latent diffusion + ControlNet, weights from {ckpt_dir}, {num_inference_steps} DDIM steps at "
            f"strength {float(strength):g}, residual decoding {flag(residual_decoding)}, data consistency "
            f"{flag(consistency)}, seed {seed}; classical filters tuned against the reference"
        ]
    loaded = None
    for task, title, modality, path in cases:
        if loaded != path:
            ref, loaded = load_volume(path), path
            affine, x = np.asarray(ref.affine), ref.as_tensor()[0]
            lines += [
                f"{modality.upper()} sample: {path}  grid {tuple(x.shape)}  spacing "
                f"{spacing_of(affine).round(3).tolist()} mm",
                f"{'task':<20} {'method':<18} {'PSNR dB':>8} {'SSIM':>7} {MAE_COLUMN[modality]:>12} {'seconds':>8}",
            ]
        y, y_aff = degrade_for_task(task, x, affine, seed)
        dtype = output_dtype(modality)
        save_volume(y, y_aff, out / f"{task}_input.nii.gz", dtype=dtype)
        restored = restore_all(task, y, y_aff, spacing_of(affine))
        # the super-resolution specialist changes the grid; same-grid tasks need the modality's restoration network
        if regression is not None and (y.shape != x.shape or regression["restoration"][modality] is not None):
            t0 = time.perf_counter()
            v, _, _, _ = enhance_volume(
                MetaTensor(y[None], affine=torch.as_tensor(y_aff)),
                regression,
                spacing_of(affine).tolist(),
                modality,
                sliding_window=sliding_window,
                method="regression",
                consistency=flag(consistency, "data_consistency"),
                amp=flag(amp, "amp"),
            )
            restored["regression"] = (v[0], time.perf_counter() - t0)
        if networks is not None:
            t0 = time.perf_counter()
            v, _, out_affine, _ = enhance_volume(
                MetaTensor(y[None], affine=torch.as_tensor(y_aff)),
                networks,
                spacing_of(affine).tolist(),
                modality,
                num_inference_steps,
                seed,
                sliding_window=sliding_window,
                strength=float(strength),
                residual_decoding=flag(residual_decoding, "residual_decoding"),
                consistency=flag(consistency, "data_consistency"),
                amp=flag(amp, "amp"),
            )
            if v[0].shape != x.shape or not np.allclose(out_affine, affine, atol=1e-4):
                raise RuntimeError(f"{task}: the enhanced grid {tuple(v[0].shape)} does not match the reference's")
            restored["ours"] = (v[0], time.perf_counter() - t0)
        results = {
            m: {"volume": v, "seconds": sec, "metrics": score(v, x, modality)} for m, (v, sec) in restored.items()
        }
        classical = [m for m in results if m not in ("degraded input", "ours", "regression")]
        best = max(classical, key=lambda m: results[m]["metrics"]["psnr"])
        shown = resample(y, y_aff, spacing_of(affine), "trilinear")[0]  # y itself on the same grid
        methods = [best, *[m for m in ("regression", "ours") if m in results]]
        for m in methods:
            save_volume(results[m]["volume"], affine, out / f"{task}_{m.replace(' ', '_')}.nii.gz", dtype=dtype)
        panels = {
            "input" if y.shape == x.shape else "input (trilinear)": shown,
            **{m: results[m]["volume"] for m in methods},
            "reference": x,
        }
        montage(
            panels,
            affine,
            out / f"{task}.png",
            CT_WINDOW if modality == "ct" else (0.0, float(torch.quantile(x.flatten()[::7].float(), 0.995))),
            difference=(methods[-1], "reference"),
            title=f"{title}: "
            + (
                f"{' and '.join(methods[1:])} and the best classical method"
                if methods[1:]
                else f"classical baseline ({best})"
            ),
        )
        report[task] = {m: {"metrics": r["metrics"], "seconds": r["seconds"]} for m, r in results.items()}
        for m, r in results.items():
            k = r["metrics"]
            lines.append(
                f"{task:<20} {m:<18} {k['psnr']:8.2f} {k['ssim']:7.4f} {k[MAE_KEY[modality]]:12.4g} "
                f"{r['seconds']:8.2f}" + ("  <- best classical" if m == best else "")
            )
    lines.append(f"outputs and montages in {out}/")
    print("\n".join(lines))
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    return report


def make_sample(lung1: str, output: str, first_slice: int = 12, n_slices: int = 24) -> str:
    """Build the committed demo sample from PyRadiomics' lung1 CT: 2x2 in-plane block average, 24 slices.

    The whole axial field of view is kept, because projection-domain noise depends on the whole cross-section.
    """
    img = load_volume(lung1)
    v = img.as_tensor()[0, :, :, first_slice : first_slice + n_slices]
    v = torch.nn.functional.avg_pool2d(v.permute(2, 0, 1)[:, None], 2)[:, 0].permute(1, 2, 0)
    aff = np.asarray(img.affine) @ np.diag([2.0, 2.0, 1.0, 1.0])
    aff[:3, 3] = (np.asarray(img.affine) @ np.array([0.5, 0.5, first_slice, 1.0]))[:3]
    return str(save_volume(v, aff, output, dtype="int16"))


def crop_sample(volume: str, output: str, start: Sequence[int], size: Sequence[int]) -> str:
    """Build a committed demo sample as a crop of ``size`` voxels from ``start`` of a real volume (its grid and
    world position kept; stored as int16)."""
    img = load_volume(volume)
    v = img.as_tensor()[0][tuple(slice(a, a + n) for a, n in zip(start, size))]
    aff = np.asarray(img.affine).copy()
    aff[:3, 3] = (np.asarray(img.affine) @ np.array([*start, 1.0]))[:3]
    return str(save_volume(v, aff, output, dtype="int16"))


if __name__ == "__main__":
    import fire

    fire.Fire(
        {"run": lambda *a, **k: run_demo(*a, **k) and None, "make_sample": make_sample, "crop_sample": crop_sample}
    )
