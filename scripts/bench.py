"""``make bench``: seconds and peak memory of the degradations and classical baselines on a 256x256x128 volume,
and of the main job, posterior sampling and the demo; the size of the shipped networks' weights.

Each case runs in a fresh process; peak memory is that process's maximum resident set size minus what it held
after the imports and the input were ready, so the figures are comparable between cases.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource
import time
from collections.abc import Sequence

import numpy as np
import torch
from scripts.baselines import bm4d_available

SHAPE = (256, 256, 128)
SPACING = (0.8, 0.8, 2.5)
# the shipped networks' definitions (inference.json) and the training settings they share (common.json)
DEFINITIONS = ("configs/common.json", "configs/inference.json")


def _volume(shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    """A smooth synthetic CT-like volume in HU: a water ellipse with a few denser structures."""
    x, y, z = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = ((x / 0.9) ** 2 + (y / 0.7) ** 2 < 1).float()
    rods = sum(((x - a) ** 2 + (y - b) ** 2 < 0.01).float() for a, b in ((0.3, 0.1), (-0.4, -0.2), (0.0, 0.4)))
    return -1000 + 1000 * body + 600 * rods + 30 * torch.sin(6 * z)


def _case(name: str, queue: mp.Queue) -> None:
    from scripts.baselines import bm4d_denoise, gaussian_denoise, nlm_denoise, resample
    from scripts.degradations import blur, kspace_truncate, lowdose_ct, rician_noise, thick_slice, thick_slice_affine

    torch.set_num_threads(torch.get_num_threads())
    x = _volume()
    affine = np.diag([*SPACING, 1.0])
    thick = thick_slice(x, 2)
    thick_aff = thick_slice_affine(affine, SHAPE[2], 2)
    cases = {
        "thick_slice x2 (box)": lambda: thick_slice(x, 2),
        "lowdose_ct 0.25 (360 views)": lambda: lowdose_ct(x, SPACING, 0.25),
        "rician_noise": lambda: rician_noise(x + 1000, 20.0),
        "kspace_truncate x2": lambda: kspace_truncate(x, 2),
        "blur gaussian 1 mm": lambda: blur(x, 1.0, SPACING),
        "SR trilinear 5->2.5 mm": lambda: resample(thick, thick_aff, SPACING, "trilinear"),
        "SR bspline 5->2.5 mm": lambda: resample(thick, thick_aff, SPACING, "bspline"),
        "denoise gaussian 0.8 mm": lambda: gaussian_denoise(x, affine, 0.8),
        "denoise nlm (2D slices)": lambda: nlm_denoise(x),
        "denoise bm4d (optional package)": lambda: bm4d_denoise(x),
    }
    cases.update(_autoencoder_cases())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    cases[name]()
    seconds = time.perf_counter() - t0
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    queue.put((seconds, peak_mib))


def _autoencoder_cases() -> dict:
    """The full-size autoencoder of configs/inference.json: one training step on a patch and one decoded inference
    window."""
    from monai.bundle import ConfigParser
    from scripts.autoencoder import decode_volume, latent_roi

    common = definitions()
    parser = ConfigParser({"ae": common["autoencoder_def"]})
    ae = parser.get_parsed_content("ae")
    patch = common["patch_size"]
    window = latent_roi(ae, common["sliding_window"]["roi_size"])  # one inference window

    def train_step():
        x = torch.rand(1, 1, *patch)
        recon, mu, sigma = ae(x)
        (recon - x).abs().mean().backward()

    def decode_window():
        with torch.no_grad():
            decode_volume(ae, torch.randn(1, common["autoencoder_def"]["latent_channels"], *window), window)

    return {"AE train step (1 patch)": train_step, "AE decode 1 latent window": decode_window}


def windows_for(shape: tuple[int, ...] = (512, 512, 256)) -> str:
    """How many decode windows a volume needs with the main job's window settings."""
    import math

    from scripts.autoencoder import _starts, slice_wise_target

    common = definitions()
    f = 2 ** (len(common["autoencoder_def"]["channels"]) - 1)
    factors = (f, f, 1 if slice_wise_target(common["autoencoder_def"]["_target_"]) else f)
    roi = [r // k for r, k in zip(common["sliding_window"]["roi_size"], factors)]
    step = [max(1, int(r * (1 - common["sliding_window"]["overlap"]))) for r in roi]
    n = math.prod(len(_starts(s // k, r, st)) for s, k, r, st in zip(shape, factors, roi, step))
    return (
        f"full-size autoencoder {common['autoencoder_def']['channels']}, patch {common['patch_size']}; "
        f"a {'x'.join(map(str, shape))} volume decodes in {n} latent windows of {roi}"
    )


def definitions() -> dict:
    """The raw (unparsed) entries of ``DEFINITIONS``, later files over earlier ones."""
    import json

    merged: dict = {}
    for name in DEFINITIONS:
        with open(name) as f:
            merged.update(json.load(f))
    return merged


NAMES = [
    "thick_slice x2 (box)",
    "lowdose_ct 0.25 (360 views)",
    "rician_noise",
    "kspace_truncate x2",
    "blur gaussian 1 mm",
    "SR trilinear 5->2.5 mm",
    "SR bspline 5->2.5 mm",
    "denoise gaussian 0.8 mm",
    "denoise nlm (2D slices)",
    *(["denoise bm4d (optional package)"] if bm4d_available() else []),
    "AE train step (1 patch)",
    "AE decode 1 latent window",
]


def seam_ratio(overlap: float, halo: int, seed: int = 0) -> float:
    """Error next to window borders over error elsewhere, for one windowed noise prediction of the tiny prior +
    ControlNet (``configs/tiny.json``, random weights, 48x16x8 latent, 16x16x8 windows) against the whole latent."""
    import json

    from monai.bundle import ConfigParser
    from scripts.autoencoder import _starts, tiled_apply
    from scripts.diffusion import ControlledDenoiser

    with open("configs/tiny.json") as f:
        tiny = ConfigParser(json.load(f))
    torch.manual_seed(seed)
    unet, cnet = tiny.get_parsed_content("diffusion_def").eval(), tiny.get_parsed_content("controlnet_def").eval()
    for p in [*unet.parameters(), *cnet.parameters()]:  # zero-initialised output layers would hide everything
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    z = torch.randn(1, 2, 48, 16, 8, generator=torch.Generator().manual_seed(seed + 1))
    cond = torch.randn(1, 2, 48, 16, 8, generator=torch.Generator().manual_seed(seed + 2))  # encoded condition
    t = torch.tensor([500])

    def predict(window: torch.Tensor) -> torch.Tensor:
        return ControlledDenoiser(unet, cnet)(window[:, :2], t, window[:, 2:])

    joined = torch.cat([z, cond], 1)
    with torch.no_grad():
        whole = predict(joined)
        err = (tiled_apply(predict, joined, (16, 16, 8), 1.0, overlap, halo=halo) - whole).abs()[0].mean(dim=(0, 2, 3))
    step = max(1, int(16 * (1 - overlap)))
    borders = set(_starts(48, 16, step)) | {s + 16 for s in _starts(48, 16, step)}
    near = np.zeros(48, bool)
    for b in borders:
        if 0 < b < 48:
            near[max(0, b - 1) : b + 1] = True
    return float(err[near].mean() / err[~near].mean())


def seams() -> None:
    """``python -m scripts.bench seams``: the seam table behind the sampling window settings in docs/README.md."""
    print("border/interior error of a windowed latent noise prediction (tiny networks)")
    print(f"{'overlap':>8} {'halo 0':>7} {'halo 4':>7} {'halo 8':>7}")
    for overlap in (0.25, 0.5):
        print(f"{overlap:>8} " + " ".join(f"{seam_ratio(overlap, h):7.2f}" for h in (0, 4, 8)))


def enhance_bench(steps: int = 1, config: str = "common", shape: tuple[int, int, int] = SHAPE) -> None:
    """``python -m scripts.bench enhance``: seconds and peak memory of the main job on a ``shape`` volume with the
    networks of ``configs/<config>.json`` (random weights: speed and memory do not depend on them), ``steps`` DDIM
    steps and the configured windows, 5 mm -> 2.5 mm through-plane; then the classical baselines, same run."""
    from monai.bundle import ConfigParser
    from scripts.baselines import resample
    from scripts.enhance import enhance_volume

    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = ConfigParser()
    parser.read_config(list(DEFINITIONS) + ([] if config == "common" else [f"configs/{config}.json"]))
    torch.manual_seed(0)
    networks = {
        name: parser.get_parsed_content(f"{name}_def").to(device).eval()
        for name in ("autoencoder", "diffusion", "controlnet")
    }
    networks.update(
        scheduler=parser.get_parsed_content("inference_scheduler_def"),
        scale_factor=1.0,
        encode_condition=parser["encode_condition"],
    )
    from monai.data import MetaTensor

    thick = _volume(tuple(shape))[:, :, ::2][None]
    affine = np.diag([SPACING[0], SPACING[1], 2 * SPACING[2], 1.0])
    image = MetaTensor(thick, affine=torch.as_tensor(affine))
    target = list(SPACING)
    sw = parser["sliding_window"]
    print(
        f"main job: {tuple(thick.shape[1:])} at {affine.diagonal()[:3].tolist()} mm -> {target} mm; {config} "
        f"networks, {steps} DDIM step(s), windows {sw}; device {device}"
    )

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
        else:
            peak = f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20:.2f} GiB RSS growth"
        return time.perf_counter() - t0, peak

    seconds, peak = timed(
        lambda: enhance_volume(image, networks, target, "ct", steps, sliding_window=sw, device=device, progress=False)
    )
    print(f"{'latent diffusion + ControlNet':<32} {seconds:9.2f} s  {peak}")
    for method in ("trilinear", "bspline"):
        seconds, peak = timed(lambda: resample(thick[0], affine, target, method))
        print(f"{'classical ' + method:<32} {seconds:9.2f} s  {peak}")


def posterior_bench(shape: tuple[int, int, int] = (96, 96, 64), steps: int = 1) -> None:
    """Seconds and peak memory per posterior-sampling step (DPS and DMPS) with the full-size networks of
    configs/inference.json (random weights: cost, not quality) on a thick-slice input, one latent window."""
    from monai.bundle import ConfigParser
    from scripts.grid import fov_grid
    from scripts.posterior import forward_operator, posterior_sample

    common = ConfigParser(definitions())
    ae, prior = common.get_parsed_content("autoencoder_def").eval(), common.get_parsed_content("diffusion_def").eval()
    scheduler = common.get_parsed_content("inference_scheduler_def")
    thick_affine = np.diag([1.0, 1.0, 2.0, 1.0])
    thick = (shape[0], shape[1], shape[2] // 2)
    out_shape, out_affine, _ = fov_grid(thick, thick_affine, [1.0, 1.0, 1.0])
    op = forward_operator("thick_slice", thick, thick_affine, out_shape, out_affine)
    observed = torch.rand(1, 1, *thick)
    print(f"posterior sampling, {shape} output, full-size networks, CPU threads {torch.get_num_threads()}")
    for method in ("dmps", "dps"):
        t0 = time.perf_counter()
        posterior_sample(
            ae,
            prior,
            scheduler,
            1.0,
            observed,
            op,
            out_shape,
            0.01,
            steps,
            torch.Generator(),
            method,
            roi_size=[s // 4 for s in shape],
            progress=False,
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{method:<6} {(time.perf_counter() - t0) / steps:9.1f} s/step  peak process memory {peak:.2f} GiB")


def sizes(config_files: Sequence[str] = DEFINITIONS) -> None:
    """``python -m scripts.bench sizes``: parameters and float32 weight size of each network that ``models/``
    ships, built from ``config_files`` (later files override earlier ones, as in ``monai.bundle run``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    total = 0
    for name in ("autoencoder", "diffusion", "controlnet", "regression"):
        n = sum(p.numel() for p in parser.get_parsed_content(f"{name}_def").parameters())
        total += n
        print(f"{name:<12} {n / 1e6:7.2f} M parameters {4 * n / 1e6:7.1f} MB float32")
    print(f"{'total':<12} {total / 1e6:7.2f} M parameters {4 * total / 1e6:7.1f} MB float32 (budget about 150 MB)")


def engine_bench(repeats: int = 2, config_files: Sequence[str] = DEFINITIONS) -> None:
    """``python -m scripts.bench engine``: one training iteration of each network of ``config_files`` (later files
    override earlier ones) on its training patch (batch 2, as 2 crops of one volume), float32 against bfloat16
    autocast + channels-last (``scripts.engine``), measured side by side in one process; the best of
    ``repeats`` after a warm-up."""
    from monai.bundle import ConfigParser
    from scripts.engine import prepare_network, run_network

    parser = ConfigParser()
    parser.read_config(list(config_files))
    patch = list(parser.get_parsed_content("patch_size"))
    latent_patch = list(parser.get_parsed_content("latent_patch_size"))
    latent_channels = int(parser.get("autoencoder_def")["latent_channels"])
    print(f"one training iteration (forward, backward, AdamW step), batch 2, {torch.get_num_threads()} threads")
    print(f"{'network':<12} {'input':<22} {'float32 s':>10} {'bf16+CL s':>10} {'ratio':>6}")

    def step(net: torch.nn.Module, x: torch.Tensor, amp: bool, extra: dict) -> float:
        opt = torch.optim.AdamW(net.parameters(), 1e-4)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            out = run_network(net, x, "cpu", amp, **extra)
            loss = (out[0] if isinstance(out, (tuple, list)) else out).abs().mean()  # the AE returns (recon, mu, s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    for name in ("regression", "autoencoder", "diffusion"):
        shape = [2, 1, *patch] if name != "diffusion" else [2, latent_channels, *latent_patch]
        extra = {"timesteps": torch.tensor([10, 500])} if name == "diffusion" else {}
        secs = []
        for amp in (False, True):
            torch.manual_seed(0)
            net = prepare_network(parser.get_parsed_content(f"{name}_def", instantiate=True), "cpu", amp)
            secs.append(step(net, torch.randn(shape), amp, extra))
        print(f"{name:<12} {str(tuple(shape)):<22} {secs[0]:10.2f} {secs[1]:10.2f} {secs[0] / secs[1]:6.2f}")


def precision_check(
    datalist: str = "outputs/release/lowdose/datalist.json", iterations: int = 100, seed: int = 0
) -> None:
    """``python -m scripts.bench precision``: does bfloat16 hold back the regression peer's learning? The peer of
    ``configs/inference.json``, started as the identity (``identity_start``), trained ``iterations`` steps (batches of
    2) on 32 fixed training pairs of 96x96x32 from ``datalist`` (the release pairs), in bfloat16 + channels-last and
    in float32 from the same initialisation; validation L1 on 8 other pairs against the identity's."""
    import copy

    from monai.bundle import ConfigParser
    from scripts.datalist import read_datalist
    from scripts.engine import prepare_network, run_network
    from scripts.trainers import identity_start

    torch.manual_seed(seed)
    parser = ConfigParser()
    parser.read_config(["configs/train_regression.json"])
    parser.update({"datalist": datalist, "patch_size": [96, 96, 32]})
    pairs_of = parser.get_parsed_content("train#preprocessing")
    pairs_of.set_random_state(seed)
    pairs = [p for item in read_datalist(datalist, "training")[:20] for p in pairs_of(dict(item))]
    x, y = torch.stack([p["condition"] for p in pairs]), torch.stack([p["image"] for p in pairs])
    print(f"identity: validation L1 {(x[32:40] - y[32:40]).abs().mean():.4f}")
    start = identity_start(parser.get_parsed_content("regression_def"))
    for amp in (True, False):
        net = prepare_network(copy.deepcopy(start), "cpu", amp)
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        t0 = time.perf_counter()
        for _ in range(iterations):
            idx = torch.randint(0, 32, (2,))
            loss = (run_network(net, x[idx], "cpu", amp) - y[idx]).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = (run_network(net, x[32:40], "cpu", False) - y[32:40]).abs().mean()
        print(
            f"{'bfloat16' if amp else 'float32':<9} {iterations} iterations in {time.perf_counter() - t0:.0f} s: "
            f"validation L1 {val:.4f}"
        )


def demo_bench(steps: int = 10) -> None:
    """``python -m scripts.bench demo``: wall time of the demo with ours included, as a user's ``make demo`` would
    run it once ``models/`` holds trained weights: random weights of ``configs/inference.json``'s networks in a
    temporary ``ckpt_dir`` (speed does not depend on them), the whole ``monai.bundle run`` process timed."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from monai.bundle import ConfigParser

    common = ConfigParser(definitions())
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        names = ("autoencoder", "diffusion", "controlnet", "restoration_ct", "restoration_mr")
        weights = {"model.pt": "network_def", **{f"{n}.pt": f"{n}_def" for n in names}}
        for file, net_id in weights.items():
            torch.save(common.get_parsed_content(net_id).state_dict(), Path(d) / file)
        (Path(d) / "autoencoder_scale.json").write_text(json.dumps({"scale_factor": 1.0}))
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                "configs/demo.json",
                "--ckpt_dir",
                d,
                "--output_dir",
                str(Path(d) / "demo"),
                "--num_inference_steps",
                str(steps),
            ],
            check=True,
            capture_output=True,
        )
        print(
            f"demo (both tasks, classical + ours with {steps} DDIM steps, random weights): "
            f"{time.perf_counter() - t0:.1f} s wall, {torch.get_num_threads()} torch threads"
        )


MAIN_JOB_CASES = (
    "ours: same-grid restoration",
    "ours: 5 -> 2.5 mm + data consistency",
    "denoise gaussian 0.8 mm",
    "denoise nlm (2D slices)",
    *(["denoise bm4d (optional package)"] if bm4d_available() else []),
)


def _main_job_case(name: str, shape: tuple[int, int, int], queue: mp.Queue) -> None:
    """One case of ``main_job_bench`` in this (fresh) process: the main job's default method with the shipped
    weights of ``models/``, or a classical denoiser, on a noisy synthetic CT of ``shape``."""
    from monai.data import MetaTensor
    from scripts.baselines import bm4d_denoise, gaussian_denoise, nlm_denoise
    from scripts.enhance import enhance_volume, inference_parser

    torch.manual_seed(0)
    x = _volume(shape) + 20 * torch.randn(shape)
    affine = np.diag([*SPACING, 1.0])
    networks = inference_parser(["configs/inference.json"], ckpt_dir="models").get_parsed_content("networks")
    thick = MetaTensor(x[:, :, ::2][None], affine=torch.as_tensor(np.diag([*SPACING[:2], 2 * SPACING[2], 1.0])))
    image = MetaTensor(x[None], affine=torch.as_tensor(affine))
    common = {"modality": "ct", "method": "regression", "amp": True, "progress": False}
    cases = {
        "ours: same-grid restoration": lambda: enhance_volume(image, networks, **common),
        "ours: 5 -> 2.5 mm + data consistency": lambda: enhance_volume(
            thick, networks, list(SPACING), consistency=True, **common
        ),
        "denoise gaussian 0.8 mm": lambda: gaussian_denoise(x, affine, 0.8),
        "denoise nlm (2D slices)": lambda: nlm_denoise(x),
        "denoise bm4d (optional package)": lambda: bm4d_denoise(x),
    }
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    cases[name]()
    seconds = time.perf_counter() - t0
    queue.put((seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20))


def main_job_bench(shape: tuple[int, int, int] = (512, 512, 128)) -> None:
    """``python -m scripts.bench main``: the main job as it ships (``configs/inference.json``'s default, the
    regression stage with the weights of ``models/``, bfloat16 on a CPU) on a ``shape`` CT, on its own grid (the CT
    denoiser) and 5 -> 2.5 mm (the super-resolution network with data consistency), then the classical denoisers on
    the same volume; seconds and peak memory, each case in a fresh process."""
    ctx = mp.get_context("spawn")
    print(f"CT {tuple(shape)} at {SPACING} mm (the 5 mm case: every other slice); {torch.get_num_threads()} threads")
    print(f"{'case':<40} {'seconds':>8} {'peak GiB':>9}")
    for name in MAIN_JOB_CASES:
        q = ctx.Queue()
        p = ctx.Process(target=_main_job_case, args=(name, tuple(shape), q))
        p.start()
        seconds, peak = q.get()
        p.join()
        print(f"{name:<40} {seconds:8.1f} {peak:9.2f}")


def main() -> None:
    ctx = mp.get_context("spawn")
    print(
        f"volume {SHAPE}, spacing {SPACING} mm; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, device cpu"
    )
    print(f"{'case':<30} {'seconds':>8} {'peak MiB':>9}")
    for name in NAMES:
        q = ctx.Queue()
        p = ctx.Process(target=_case, args=(name, q))
        p.start()
        seconds, peak = q.get()
        p.join()
        print(f"{name:<30} {seconds:8.2f} {peak:9.0f}")
    print(windows_for())


if __name__ == "__main__":
    import fire

    fire.Fire(
        {
            "all": main,
            "seams": seams,
            "enhance": enhance_bench,
            "main": main_job_bench,
            "posterior": posterior_bench,
            "demo": demo_bench,
            "sizes": sizes,
            "engine": engine_bench,
            "precision": precision_check,
        }
    )
