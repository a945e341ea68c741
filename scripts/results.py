"""Results on held-out validation volumes: every method on the same degraded input, scored and timed.

For each validation entry of a datalist (``scripts.datalist regions`` writes one) and each task of its modality,
the reference is degraded with a fixed seed (``scripts.baseline_report.degrade_for_task``) and restored by the
classical baselines, the regression peer and the latent ControlNet (one sample, both also with
``--data_consistency`` for super-resolution; the ControlNet's mean of K samples), and posterior sampling with the
task's known operator. Where that operator is not the identity (super-resolution, deblurring), the
data-consistency step (least squares toward the input with the known operator,
``scripts.least_squares.least_squares_consistency``) gets its own rows: after interpolation or on the input itself
(the classical counterpart, knowing the operator as posterior sampling does), and after posterior sampling (its
default finish). Oracle rows show the autoencoder's ceiling: the reference itself encoded and decoded (what a
latent method returns when its prior and ControlNet find the reference's own latent), that reconstruction after
the data-consistency step (what the step adds beyond the ceiling), and the residual-decoding design at the same
oracle latent: the input on the target grid plus the decoded change from its own latent to the reference's,
``c + D(E(x)) - D(E(c))``, in which what the autoencoder loses on both sides cancels; "ours + residual
decoding" is that design with the ControlNet's sample in place of the oracle latent (``--residual_decoding``
of the main job), from noise and from the input. Networks come from the
main job's configs (``configs/inference.json`` plus ``network_configs``) and ``ckpt_dir``, exactly as
``monai.bundle run`` builds them; methods whose weights are missing are skipped and say so. Outputs, per-case
montages (``scripts.evaluate``), one montage per task (input, best classical, regression, ours, reference),
``results.json`` and the markdown table ``results.md`` go to ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from scripts.autoencoder import reconstruct_volume
from scripts.baseline_report import degrade_for_task, restore_all, sr_factor, tuned_best
from scripts.baselines import resample
from scripts.datalist import read_datalist
from scripts.enhance import enhance_volume, inference_parser, physical_range, restoration_key
from scripts.evaluate import display_window, evaluate
from scripts.figures import montage
from scripts.intensity import denormalize, intensity_params, normalize
from scripts.least_squares import estimate_noise, least_squares_consistency
from scripts.options import flag
from scripts.posterior import forward_operator, restore
from scripts.volumes import load_volume, save_volume, spacing_of

logger = logging.getLogger(__name__)

# task -> modality, the known operator of posterior sampling, and whether the ControlNet trained on its kind
TASKS: dict[str, dict] = {
    "ct_sr_5to10mm": {
        "modality": "ct",
        "operator": {"operator": "thick_slice", "factor": 2.0, "profile": "box"},
        "in_training_range": True,
    },
    "ct_sr_3to6mm": {
        "modality": "ct",
        "operator": {"operator": "thick_slice", "factor": 2.0, "profile": "box"},
        "in_training_range": True,
    },
    "ct_lowdose_quarter": {"modality": "ct", "operator": {"operator": "identity"}, "in_training_range": True},
    "ct_blur_gaussian_3mm": {
        "modality": "ct",
        "operator": {"operator": "blur", "kernel": "gaussian", "sigma_mm": 3.0},
        "in_training_range": False,
    },
    "ct_blur_gaussian_1mm": {
        "modality": "ct",
        "operator": {"operator": "blur", "kernel": "gaussian", "sigma_mm": 1.0},
        "in_training_range": True,
        "degradation": "blur",
    },
    "mr_sr_1to4mm": {
        "modality": "mr",
        "operator": {"operator": "thick_slice", "factor": 4.0, "profile": "box"},
        "in_training_range": True,
    },
    "mr_sr_1to8mm": {
        "modality": "mr",
        "operator": {"operator": "thick_slice", "factor": 8.0, "profile": "box"},
        "in_training_range": False,
    },
    "mr_rician5": {"modality": "mr", "operator": {"operator": "identity"}, "in_training_range": True},
    "mr_rician4": {"modality": "mr", "operator": {"operator": "identity"}, "in_training_range": True},
    "mr_kspace2": {
        "modality": "mr",
        "operator": {"operator": "kspace", "factor": 2.0},
        "in_training_range": True,
        "degradation": "kspace",
    },
}
METHODS = (
    "classical",
    "autoencoder ceiling",
    "regression",
    "ours",
    "ours + data consistency",
    "ours from the input",
    "ours + residual decoding",
    "ours mean",
    "posterior",
    "posterior from the input",
    "two-stage",
    "two-stage mean",
)
# the chain over the regression output (``--two_stage true``), at the main job's defaults, with its own ControlNet
TWO_STAGE_METHODS = {"two-stage", "two-stage mean"}
LATENT_METHODS = {
    "autoencoder ceiling",
    "ours",
    "ours + data consistency",
    "ours from the input",
    "ours + residual decoding",
    "ours mean",
}


def _is_sr(task: str) -> bool:
    return TASKS[task]["operator"]["operator"] == "thick_slice"


def _degradation(task: str, networks: dict, modality: str) -> dict:
    """The main job's ``--degradation`` options for ``task``, as a user would give them: the task's own (k-space;
    blur with its known kernel) when its network is loaded, else ``noise`` (the modality's denoiser, as without the
    option; logged)."""
    kind = TASKS[task].get("degradation", "noise")
    restoration = networks.get("restoration")
    if kind != "noise" and not (
        isinstance(restoration, dict) and restoration.get(restoration_key(modality, kind)) is not None
    ):
        logger.warning("%s: no %s_%s restoration network; the regression row is the denoiser's", task, modality, kind)
        return {"degradation": "noise"}
    known = TASKS[task]["operator"]
    if kind == "blur":
        return {"degradation": kind, "kernel": known["kernel"], "sigma_mm": known["sigma_mm"]}
    if kind == "kspace":
        return {"degradation": kind, "kspace_factor": known["factor"]}
    return {"degradation": kind}


def usable_slices(task: str, n: int) -> int:
    """The reference's slices that a super-resolution task uses: a whole number of thick slices (53 thin slices
    make 26 thick ones at factor 2, which cover 52: the last is left out of reference and scores); all others."""
    factor = sr_factor(task)
    return n if factor is None or not float(factor).is_integer() else n - n % int(factor)


def fits(task: str, affine: np.ndarray) -> bool:
    """Whether a volume suits ``task``: a super-resolution task ``<m>_sr_<A>to<B>mm`` takes volumes whose slices
    are about ``A`` mm (within 30 %), so 5 -> 10 mm runs on 5 mm CT and 3 -> 6 mm on 3.27 mm CT; others take all."""
    match = re.search(r"_sr_(\d+(?:\.\d+)?)to", task)
    return match is None or abs(float(spacing_of(affine)[2]) - float(match[1])) <= 0.3 * float(match[1])


def load_networks(
    config_files: Sequence[str], ckpt_dir: str, device: str, only: Sequence[str] | None = None, **overrides
) -> dict | None:
    """``networks`` of the main-job configs with weights from ``ckpt_dir`` (or just the entries ``only``), with
    config ``overrides``; ``None`` (logged) if any is missing."""
    try:
        parser = inference_parser(
            config_files, load_networks=only is None, ckpt_dir=str(Path(ckpt_dir).resolve()), device=device, **overrides
        )
        if only is not None:
            return {k: parser.get_parsed_content(k) for k in only}
    except RuntimeError as err:  # the config parser wraps the loader's FileNotFoundError
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if not isinstance(cause, FileNotFoundError):
            raise
        logger.warning("skipping the networks of %s: %s", config_files, cause)
        return None
    return parser.get_parsed_content("networks")


def centre_crop(x: torch.Tensor, affine: np.ndarray, size: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
    """The centre of ``x`` of at most ``size`` voxels per axis (-1: the whole axis), and its affine."""
    starts = [0 if s < 0 or s >= n else (n - s) // 2 for n, s in zip(x.shape, size)]
    stops = [n if s < 0 or s >= n else st + s for n, s, st in zip(x.shape, size, starts)]
    cropped = affine.copy()
    cropped[:3, 3] = (affine @ np.array([*starts, 1.0]))[:3]
    return x[tuple(slice(a, b) for a, b in zip(starts, stops))], cropped


def autoencoder_ceiling(
    x: torch.Tensor, autoencoder: torch.nn.Module, modality: str, sliding_window: dict, device: str
) -> torch.Tensor:
    """The reference ``x`` encoded and decoded in windows, in its own units: what a latent method returns when it
    finds the reference's own latent, i.e. the fidelity the autoencoder allows however good the prior is."""
    params = intensity_params(x, modality)
    image = normalize(x.float(), params)[None, None].to(device)
    with torch.autocast("cuda", enabled=torch.device(device).type == "cuda"):
        out = reconstruct_volume(autoencoder.eval(), image, sliding_window["roi_size"], sliding_window["overlap"])
    return physical_range(denormalize(out[0, 0].float().cpu(), params), x, modality)


def _data_consistency(
    task: str, x: torch.Tensor, affine: np.ndarray, y: torch.Tensor, y_aff: np.ndarray, modality: str, iters: int
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a task with a known operator other than the identity, the map from a volume on the reference grid to
    its least-squares correction toward ``y`` (``least_squares_consistency``, noise estimated from ``y``), as
    posterior sampling ends; ``None`` for denoising."""
    known = dict(TASKS[task]["operator"])
    name = known.pop("operator")
    if name == "identity" or iters <= 0:
        return None
    operator = forward_operator(name, y.shape, y_aff, x.shape, affine, **known)
    observed, sigma = y.float(), estimate_noise(y.float())
    return lambda v: physical_range(least_squares_consistency(v.float(), observed, operator, sigma, iters), y, modality)


def _timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[torch.Tensor, float]:
    cuda = torch.device(device).type == "cuda"  # "cuda" or "cuda:N"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run(
    datalist: str,
    ckpt_dir: str = "models",
    output_dir: str = "outputs/results",
    network_configs: Sequence[str] = (),
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] = METHODS,
    num_inference_steps: int = 20,
    num_samples: int = 4,
    posterior_steps: int = 50,
    sliding_window: dict | None = None,
    device: str = "cpu",
    seed: int = 0,
    crop: Sequence[int] | None = None,
    strength: float = 0.5,
    consistency_iters: int = 20,
    posterior_step_size: float = 0.5,
    amp: bool = True,
    two_stage_ckpt_dir: str | None = None,
) -> dict:
    """Run, score and time every method on every validation volume; write ``results.md``/``results.json``.

    ``crop`` (voxels per axis, -1 for all) keeps the centre of each validation volume, to shorten CPU runs; the
    low-dose CT task needs whole axial slices (its noise is made in the projection domain) and refuses a crop.
    "ours from the input" and "posterior from the input" start sampling from the noised encoded input at
    ``strength`` (``--strength``). Posterior sampling takes ``posterior_step_size`` (``--step_size`` of
    ``configs/inference_posterior.json`` unless given).
    ``consistency_iters`` is posterior sampling's image-space finish (``configs/inference_posterior.json``),
    reported as its own row and applied to the classical start and the autoencoder ceiling as well.
    ``amp``: the networks under ``scripts.engine``'s autocast, as the main job runs them (``--amp``).
    "two-stage" and "two-stage mean" run the chain of ``--two_stage true`` (the regression network, then the
    ControlNet on its output) at the main job's defaults (``strength``, residual decoding, data consistency on
    super-resolution), one sample and the mean of ``num_samples``; its networks come from ``two_stage_ckpt_dir``
    (default ``ckpt_dir``), as its ControlNet is trained on the regression output rather than on the input.
    """
    net_cfgs = list(network_configs)
    tasks = list(tasks or TASKS)
    if crop is not None and any(t.startswith("ct_lowdose") for t in tasks):
        raise ValueError("ct_lowdose_quarter: low-dose noise is made from whole axial slices; run it without crop")
    ours = posterior_nets = regression = None
    if LATENT_METHODS & set(methods) == {"autoencoder ceiling"}:  # stage 1 alone: its weights suffice
        ours = load_networks(["configs/inference.json", *net_cfgs], ckpt_dir, device, ("autoencoder",))
    elif LATENT_METHODS & set(methods):
        ours = load_networks(
            ["configs/inference.json", "configs/inference_diffusion.json", *net_cfgs], ckpt_dir, device
        )
    # posterior sampling: the prior and autoencoder of ``ours`` when loaded; without a ControlNet on their own
    if {"posterior", "posterior from the input"} & set(methods):
        posterior_nets = (
            {k: ours[k] for k in ("autoencoder", "diffusion", "scheduler", "scale_factor")}
            if ours
            else load_networks(
                ["configs/inference.json", "configs/inference_posterior.json", *net_cfgs], ckpt_dir, device
            )
        )
    if "regression" in methods:
        regression = load_networks(["configs/inference.json", *net_cfgs], ckpt_dir, device)
    chain = None
    if TWO_STAGE_METHODS & set(methods):
        chain = load_networks(
            ["configs/inference.json", "configs/inference_diffusion.json", *net_cfgs],
            two_stage_ckpt_dir or ckpt_dir,
            device,
            two_stage=True,
        )
    if sliding_window is None:
        parser = inference_parser(["configs/inference.json", *net_cfgs], load_networks=False)
        sliding_window = parser.get_parsed_content("sliding_window")
    out_root = Path(output_dir)
    lines = [
        f"| volume | task | method | PSNR (dB) | SSIM | MAE | HU-MAE body | sharpness | seconds ({device}) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary: dict = {
        "device": device,
        "ckpt_dir": str(ckpt_dir),
        "network_configs": net_cfgs,
        "crop": crop,
        "num_inference_steps": num_inference_steps,
        "num_samples": num_samples,
        "posterior_steps": posterior_steps,
        "strength": strength,
        "sliding_window": sliding_window,
        "cases": {},
    }
    for entry in read_datalist(datalist, "validation"):
        modality = entry.get("modality", "ct")
        name = Path(entry["image"]).name.split(".")[0]
        ref = load_volume(entry["image"])
        affine, x = np.asarray(ref.affine), ref.as_tensor()[0].double()
        if crop is not None:
            x, affine = centre_crop(x, affine, crop)
        whole = x
        for task in [t for t in tasks if TASKS[t]["modality"] == modality and fits(t, affine)]:
            task_dir = out_root / name / task
            x = whole[..., : usable_slices(task, whole.shape[-1])]
            y, y_aff = degrade_for_task(task, x, affine, seed)
            save_volume(x, affine, task_dir / "reference.nii.gz")
            save_volume(y, y_aff, task_dir / "degraded.nii.gz")
            restored: dict[str, tuple[torch.Tensor, float]] = {}
            consistent = _data_consistency(task, x, affine, y, y_aff, modality, consistency_iters)
            on_grid = resample(y, y_aff, spacing_of(affine), "trilinear")[0]  # y itself on the same grid
            if "classical" in methods:
                restored.update(restore_all(task, y, y_aff, spacing_of(affine)))
                start = "trilinear" if _is_sr(task) else "degraded input"
                if consistent is not None:  # the known operator's least squares, from interpolation or the input
                    vol, sec = restored[start]
                    dc, dc_sec = _timed(lambda: consistent(vol), "cpu")
                    restored[f"{start} + data consistency"] = (dc, sec + dc_sec)
            classical = set(restored)
            image = MetaTensor(y.float()[None], affine=torch.as_tensor(y_aff))
            common = {
                "target_spacing": spacing_of(affine).tolist(),
                "modality": modality,
                "num_inference_steps": num_inference_steps,
                "seed": seed,
                "sliding_window": sliding_window,
                "device": device,
                "progress": False,
                "amp": flag(amp, "amp"),
            }
            autoencoder = (ours or posterior_nets or {}).get("autoencoder")
            if "autoencoder ceiling" in methods and autoencoder is not None:
                ceiling = _timed(lambda: autoencoder_ceiling(x, autoencoder, modality, sliding_window, device), device)
                restored["autoencoder ceiling (oracle)"] = ceiling
                restored["residual decoding ceiling (oracle)"] = _timed(
                    lambda: physical_range(
                        on_grid
                        + ceiling[0]
                        - autoencoder_ceiling(on_grid, autoencoder, modality, sliding_window, device),
                        x,
                        modality,
                    ),
                    device,
                )
                if consistent is not None:
                    restored["autoencoder ceiling + data consistency (oracle)"] = _timed(
                        lambda: consistent(ceiling[0]), "cpu"
                    )
            if regression is not None:
                kind = _degradation(task, regression, modality)
                restored["regression"] = _timed(
                    lambda: enhance_volume(image, regression, method="regression", **kind, **common)[0], device
                )
                if _is_sr(task) or "kspace_factor" in kind:
                    restored["regression + data consistency"] = _timed(
                        lambda: enhance_volume(
                            image, regression, method="regression", consistency=True, **kind, **common
                        )[0],
                        device,
                    )
            if ours is not None:
                if "ours" in methods:
                    restored["ours"] = _timed(lambda: enhance_volume(image, ours, **common)[0], device)
                if "ours + data consistency" in methods and _is_sr(task):
                    restored["ours + data consistency"] = _timed(
                        lambda: enhance_volume(image, ours, consistency=True, **common)[0], device
                    )
                if "ours from the input" in methods:
                    restored[f"ours, strength {strength:g}"] = _timed(
                        lambda: enhance_volume(image, ours, strength=strength, **common)[0], device
                    )
                if "ours + residual decoding" in methods:  # from noise, and from the input
                    restored["ours + residual decoding"] = _timed(
                        lambda: enhance_volume(image, ours, residual_decoding=True, **common)[0], device
                    )
                    label = f"ours, strength {strength:g} + residual decoding"
                    restored[label] = _timed(
                        lambda: enhance_volume(image, ours, strength=strength, residual_decoding=True, **common)[0],
                        device,
                    )
                    if _is_sr(task):
                        restored[f"{label} + data consistency"] = _timed(
                            lambda: enhance_volume(
                                image, ours, strength=strength, residual_decoding=True, consistency=True, **common
                            )[0],
                            device,
                        )
                if "ours mean" in methods and num_samples > 1:
                    restored[f"ours mean of {num_samples}"] = _timed(
                        lambda: enhance_volume(image, ours, num_samples=num_samples, **common)[0], device
                    )
            if chain is not None:
                defaults = {"strength": strength, "residual_decoding": True, "consistency": _is_sr(task)}
                label = f"strength {strength:g} + residual decoding" + (" + data consistency" if _is_sr(task) else "")
                kind = _degradation(task, chain, modality)
                if "two-stage" in methods:
                    restored[f"two-stage, {label}"] = _timed(
                        lambda: enhance_volume(image, chain, **defaults, **kind, **common)[0], device
                    )
                if "two-stage mean" in methods and num_samples > 1:
                    restored[f"two-stage mean of {num_samples}, {label}"] = _timed(
                        lambda: enhance_volume(image, chain, num_samples=num_samples, **defaults, **kind, **common)[0],
                        device,
                    )
            if posterior_nets is not None:
                runs = [
                    (name, st)
                    for name, st, m in (
                        ("posterior (dps)", 1.0, "posterior"),
                        (f"posterior (dps), strength {strength:g}", strength, "posterior from the input"),
                    )
                    if m in methods
                ]
                for label, st in runs:
                    path = task_dir / "posterior.nii.gz"
                    res = restore(
                        str(task_dir / "degraded.nii.gz"),
                        str(path),
                        posterior_nets,
                        **TASKS[task]["operator"],
                        target_spacing=spacing_of(affine).tolist(),
                        modality=modality,
                        num_inference_steps=posterior_steps,
                        seed=seed,
                        step_size=posterior_step_size,
                        strength=st,
                        sliding_window=sliding_window,
                        device=device,
                        consistency_iters=0,
                    )
                    restored[label] = (load_volume(path).as_tensor()[0], res["seconds"])
                    if consistent is not None:  # what restore's default consistency_iters adds
                        dc, dc_sec = _timed(lambda: consistent(restored[label][0]), "cpu")
                        restored[f"{label} + data consistency"] = (dc, res["seconds"] + dc_sec)
            cases, seconds = [], {}
            for method, (vol, sec) in restored.items():
                path = task_dir / f"{re.sub(r'[^A-Za-z0-9]+', '_', method.replace('+', 'plus')).strip('_')}.nii.gz"
                save_volume(vol, affine, path)
                seconds[method] = sec
                cases.append(
                    {
                        "name": path.name.split(".")[0],
                        "method": method,
                        "output": str(path),
                        "reference": str(task_dir / "reference.nii.gz"),
                        "input": str(task_dir / "degraded.nii.gz"),
                    }
                )
            means = evaluate(cases, str(task_dir), modality)["mean_by_method"]
            shown = tuned_best(means)
            for m in shown:
                r = means[m]
                hu = f"{r['hu_mae_body']:.1f}" if "hu_mae_body" in r else "-"
                mae_txt = f"{r['mae']:.1f} HU" if modality == "ct" else f"{r['mae']:.4f}"
                lines.append(
                    f"| {name} | {task} | {m} | {r['psnr']:.2f} | {r['ssim']:.4f} | {mae_txt} | {hu} | "
                    f"{r.get('sharpness', float('nan')):.2f} | {seconds[m]:.1f} |"
                )
            _task_montage(
                restored, classical & set(shown), means, x, on_grid, affine, modality, task_dir / f"{task}.png", task
            )
            summary["cases"][f"{name}/{task}"] = {
                "metrics": {m: means[m] for m in shown},
                "seconds": {m: seconds[m] for m in shown},
                "in_training_range": TASKS[task]["in_training_range"],
            }
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.md").write_text("\n".join(lines) + "\n")
    (out_root / "results.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
    return summary


def _task_montage(
    restored: dict,
    classical: set[str],
    means: dict,
    x: torch.Tensor,
    on_grid: torch.Tensor,
    affine: np.ndarray,
    modality: str,
    path: Path,
    task: str,
) -> None:
    """Input (``on_grid``: on the reference grid), the best classical method, the regression peer, ours, the
    two-stage chain's one sample, the reference."""
    classical = classical - {"degraded input"}
    panels = {"input": on_grid}
    if classical:
        best = max(classical, key=lambda m: means[m]["psnr"])
        panels[best] = restored[best][0]
    for m in ("regression", "ours"):
        if m in restored:
            panels[m] = restored[m][0]
    for m in [m for m in restored if m.startswith("two-stage, ")]:
        panels["two-stage"] = restored[m][0]
    panels["reference"] = x
    montage(panels, affine, path, display_window(x.numpy(), modality), title=task)


if __name__ == "__main__":
    import fire

    fire.Fire(run)
