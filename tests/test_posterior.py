"""Zero-shot posterior sampling (configs/inference_posterior.json) with tiny networks on a real crop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scripts.baselines import resample
from scripts.degradations import thick_slice, thick_slice_affine
from scripts.enhance import data_consistency
from scripts.grid import fov_grid
from scripts.least_squares import least_squares_consistency
from scripts.posterior import forward_operator, posterior_sample
from scripts.volumes import spacing_of
from tests.conftest import ROOT, monai_bundle

TINY = json.loads((ROOT / "configs" / "tiny.json").read_text())


@pytest.fixture(scope="module")
def models(trained, tmp_path_factory) -> Path:
    """The tiny stage-1 autoencoder trained on the crops, and an untrained tiny prior."""
    ckpt = tmp_path_factory.mktemp("posterior_models")
    shutil.copy(trained[0] / "autoencoder.pt", ckpt)
    (ckpt / "autoencoder_scale.json").write_text(json.dumps({"scale_factor": 1.0}))
    torch.manual_seed(0)
    torch.save(ConfigParser(TINY).get_parsed_content("diffusion_def").state_dict(), ckpt / "diffusion.pt")
    return ckpt


@pytest.mark.parametrize(
    "operator,kw",
    [
        ("thick_slice", {"profile": "box"}),
        ("thick_slice", {"profile": "gaussian"}),
        ("blur", {"sigma_mm": 1.5}),
        ("kspace", {"factor": 2.0}),
    ],
)
def test_forward_operators_have_gradients_and_adjoints(operator, kw):
    """The operators posterior sampling differentiates: gradcheck and <A x, y> = <x, A^T y>, also for a
    non-integer thick-slice factor (2.5 mm slices from 1 mm)."""
    in_shape, in_affine = (5, 4, 4), np.diag([1.0, 1.0, 2.5, 1.0])
    out_spacing = [1.0, 1.0, 1.0] if operator == "thick_slice" else spacing_of(in_affine).tolist()
    out_shape, out_affine, _ = fov_grid(in_shape, in_affine, out_spacing)
    op = forward_operator(operator, in_shape, in_affine, out_shape, out_affine, **kw)
    x = torch.rand(1, 1, *out_shape, dtype=torch.float64, requires_grad=True)
    assert op(x).shape[2:] == in_shape
    assert torch.autograd.gradcheck(op, (x,))
    y = torch.rand_like(op(x))
    (at_y,) = torch.autograd.grad(op(x), x, y)
    assert torch.dot(op(x).flatten(), y.flatten()).item() == pytest.approx(
        torch.dot(x.flatten(), at_y.flatten()).item()
    )


def test_thick_slice_operator_matches_the_simulation():
    """For an integer factor, A on the FOV-preserving thin grid is exactly the foundation's thick-slice simulation."""
    thin = torch.rand(1, 1, 6, 5, 16, dtype=torch.float64)
    affine = np.diag([0.8, 0.8, 1.25, 1.0])
    thick_affine = thick_slice_affine(affine, 16, 4.0)
    op = forward_operator("thick_slice", (6, 5, 4), thick_affine, (6, 5, 16), affine)
    torch.testing.assert_close(op(thin), thick_slice(thin, 4.0))


@pytest.mark.parametrize("thick_spacing", [2.0, 2.5])
def test_least_squares_consistency_is_the_slab_projection(thick_spacing):
    """Without noise, CGLS with the box thick-slice operator reaches the pseudo-inverse projection of
    scripts.enhance.data_consistency (two implementations of one step), also for a non-integer factor."""
    in_affine = np.diag([1.0, 1.0, thick_spacing, 1.0])
    out_shape, out_affine, _ = fov_grid((4, 3, 6), in_affine, [1.0, 1.0, 1.0])
    op = forward_operator("thick_slice", (4, 3, 6), in_affine, out_shape, out_affine)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(out_shape, generator=gen, dtype=torch.float64), torch.rand(
        4, 3, 6, generator=gen, dtype=torch.float64
    )
    out = least_squares_consistency(x, y, op, 0.0, max_iters=50)
    torch.testing.assert_close(op(out), y)
    torch.testing.assert_close(out, data_consistency(x, y))


def test_least_squares_consistency_stops_at_the_noise_level():
    """Deblurring a noisy volume: the iterations stop once the misfit reaches sigma sqrt(m) (the discrepancy
    principle), well before they would fit the noise."""
    gen = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 24, 24, generator=gen), 3, 1, 1)[0, 0]
    op = forward_operator("blur", truth.shape, np.eye(4), truth.shape, np.eye(4), sigma_mm=1.0)
    sigma = 0.01
    y = op(truth) + sigma * torch.randn(truth.shape, generator=gen)
    stopped = least_squares_consistency(y, y, op, sigma, max_iters=200)
    fitted = least_squares_consistency(y, y, op, 0.0, max_iters=200)
    misfit = {k: float(torch.linalg.vector_norm(y - op(v))) for k, v in (("stopped", stopped), ("fitted", fitted))}
    assert misfit["fitted"] < 0.8 * sigma * y.numel() ** 0.5
    assert misfit["stopped"] == pytest.approx(sigma * y.numel() ** 0.5, rel=1e-3)
    assert float(torch.linalg.vector_norm(stopped - truth)) < 0.5 * float(torch.linalg.vector_norm(fitted - truth))


def test_least_squares_consistency_does_not_undo_denoising():
    """With the identity (denoising), a full CGLS step returns the noisy input itself; the step is shortened so
    the result keeps the misfit at the noise level: a blend that stays nearer the denoised start than y."""
    gen = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 16, 16, 16, generator=gen), 3, 1, 1)[0, 0]
    sigma = 0.05
    y = truth + sigma * torch.randn(truth.shape, generator=gen)
    start = truth + 0.5 * sigma * torch.randn(truth.shape, generator=gen)  # a denoiser's output, off by half
    op = forward_operator("identity", truth.shape, np.eye(4), truth.shape, np.eye(4))
    out = least_squares_consistency(start, y, op, sigma)
    assert float(torch.linalg.vector_norm(y - out)) == pytest.approx(sigma * y.numel() ** 0.5, rel=1e-3)
    assert float(torch.linalg.vector_norm(out - truth)) < 0.5 * float(torch.linalg.vector_norm(y - truth))


def test_guidance_makes_the_re_degraded_output_match_the_input(crops, models):
    """Guided sampling fits y better than unguided; with the image-space finish it also beats trilinear."""
    from scripts.intensity import intensity_params, normalize

    img = nib.load(crops / "c.nii.gz")
    ref = torch.as_tensor(np.asarray(img.dataobj), dtype=torch.float32)
    y = thick_slice(ref, 2.0)
    y_affine = thick_slice_affine(img.affine, ref.shape[2], 2.0)
    observed = normalize(y, intensity_params(y, "ct"))[None, None]
    op = forward_operator("thick_slice", y.shape, y_affine, ref.shape, img.affine)
    nets = ConfigParser(TINY)
    ae = nets.get_parsed_content("autoencoder_def")
    ae.load_state_dict(torch.load(models / "autoencoder.pt", weights_only=True))
    prior = nets.get_parsed_content("diffusion_def")
    prior.load_state_dict(torch.load(models / "diffusion.pt", weights_only=True))
    scheduler = ConfigParser(json.loads((ROOT / "configs" / "inference.json").read_text())).get_parsed_content(
        "inference_scheduler_def"
    )
    misfit = {}
    for name, step in (("unguided", 0.0), ("guided", 1.0)):
        x = posterior_sample(
            ae.eval(),
            prior.eval(),
            scheduler,
            1.0,
            observed,
            op,
            ref.shape,
            0.0,
            8,
            torch.Generator().manual_seed(0),
            "dmps",
            step,
            roi_size=(16, 16, 8),
            progress=False,
        )
        assert x.shape == (1, 1, *ref.shape)
        misfit[name] = float(torch.linalg.vector_norm(observed - op(x)))
    assert misfit["guided"] < 0.9 * misfit["unguided"]
    trilinear = resample(observed, y_affine, spacing_of(img.affine), "trilinear")[0]
    finished = least_squares_consistency(x, observed, op, 0.0)
    assert float(torch.linalg.vector_norm(observed - op(finished))) < 0.1 * float(
        torch.linalg.vector_norm(observed - op(trilinear))
    )


def test_posterior_contract_with_record(crops, models, tmp_path):
    """The public contract on a thick-slice input (5 mm -> 2.5 mm): grid, units, seeded determinism, the record."""
    src = crops / "c.nii.gz"
    outs = []
    for k in range(2):
        outs.append(tmp_path / f"out{k}.nii.gz")
        args = ["--record", str(tmp_path / "record")] if k == 0 else []
        res = monai_bundle(
            "['configs/inference.json','configs/inference_posterior.json','configs/tiny.json']",
            "--input_image",
            str(src),
            "--output_image",
            str(outs[-1]),
            "--ckpt_dir",
            str(models),
            "--operator",
            "thick_slice",
            "--factor",
            "2",
            "--num_inference_steps",
            "4",
            "--posterior_method",
            "dmps",
            "--seed",
            "1",
            "--device",
            "cpu",
            *args,
        )
        assert res.returncode == 0, res.stderr[-3000:]
    img, ref = nib.load(outs[0]), nib.load(src)
    shape, affine, _ = fov_grid(ref.shape, ref.affine, [1.1406, 1.1406, 2.5])
    assert img.shape == shape == (64, 64, 32) and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(nib.load(outs[1]).dataobj))
    assert len(list((tmp_path / "record").glob("step_*.png"))) == 2  # the default strength 0.5 runs 2 of the 4 steps
    assert (tmp_path / "record" / "reverse_steps.gif").stat().st_size > 0


def test_unknown_operator_is_refused():
    with pytest.raises(ValueError, match="operator must be one of"):
        forward_operator("motion", (4, 4, 4), np.eye(4), (4, 4, 4), np.eye(4))


class _OraclePrior(torch.nn.Module):
    """Predicts the exact noise toward a known clean latent (one window covers it), and counts its calls."""

    def __init__(self, clean: torch.Tensor, scheduler) -> None:
        super().__init__()
        self.clean, self.scheduler, self.calls = clean, scheduler, 0
        self.in_channels, self.block_out_channels = clean.shape[1], (8, 8)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        ab = self.scheduler.alphas_cumprod[int(timesteps[0])]
        return (x - ab.sqrt() * self.clean) / (1 - ab).sqrt()


def test_posterior_sampling_from_a_start_runs_the_last_steps_from_its_latent(crops, models):
    """``strength < 1``: the start is encoded, noised to the first of the last steps, and only those run; with an
    oracle prior toward the start's own latent and no guidance it ends on the start's reconstruction."""
    from scripts.autoencoder import decode_volume, encode_volume

    img = nib.load(crops / "c.nii.gz")
    ref = torch.as_tensor(np.asarray(img.dataobj), dtype=torch.float32)
    start = ((ref + 1000) / 2000)[None, None]
    ae = ConfigParser(TINY).get_parsed_content("autoencoder_def")
    ae.load_state_dict(torch.load(models / "autoencoder.pt", weights_only=True))
    ae.eval()
    scheduler = ConfigParser(json.loads((ROOT / "configs" / "inference.json").read_text())).get_parsed_content(
        "inference_scheduler_def"
    )
    with torch.no_grad():
        latent = encode_volume(ae, start, [64, 64, 32])
    prior = _OraclePrior(2.0 * latent, scheduler)
    op = forward_operator("identity", ref.shape, img.affine, ref.shape, img.affine)
    x = posterior_sample(
        ae,
        prior,
        scheduler,
        2.0,
        start,
        op,
        ref.shape,
        0.0,
        10,
        torch.Generator().manual_seed(0),
        "dmps",
        0.0,
        roi_size=(64, 64, 32),
        progress=False,
        start=start,
        strength=0.3,
    )
    assert prior.calls == 3
    with torch.no_grad():
        torch.testing.assert_close(x, decode_volume(ae, latent, (64, 64, 32)), atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="needs a start"):
        posterior_sample(ae, prior, scheduler, 2.0, start, op, ref.shape, 0.0, 10, strength=0.3)
