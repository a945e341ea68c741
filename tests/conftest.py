"""Shared fixtures: small synthetic phantoms, written volumes, and the repository root on sys.path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ignite.engine import Events
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = ROOT / "docs" / "samples" / "lung1_crop.nii.gz"
# the latent chain with tiny networks (the main job's default is the regression stage)
LATENT = ["configs/inference.json", "configs/inference_diffusion.json", "configs/tiny.json"]
sys.path.insert(0, str(ROOT))


def ct_phantom(shape=(48, 48, 12), spacing=(1.0, 1.0, 2.0)) -> tuple[np.ndarray, np.ndarray]:
    """Air around a water cylinder (0 HU) holding a bone rod (+700 HU) and a lung-like ellipse (-800 HU)."""
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    vol = np.full(shape, -1000.0, dtype=np.float32)
    r = min(shape[0], shape[1]) * 0.42
    vol[x**2 + y**2 < r**2] = 0.0
    vol[(x - r * 0.4) ** 2 + y**2 < (r * 0.15) ** 2] = 700.0
    vol[((x + r * 0.35) / 0.25) ** 2 + (y / 0.4) ** 2 < r**2 * (1 + 0.2 * np.sin(z / 2))] = -800.0
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-20.0, 15.0, 40.0]
    return vol, affine


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error as ``scripts.errors`` reports it: exit status 2, no traceback, and a last line of stderr
    ``error: ...`` that holds every needle (the file or option, and the reason)."""
    last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert last.startswith("error: ") and all(n in last for n in needles), last


@pytest.fixture
def phantom_file(tmp_path: Path) -> Path:
    vol, affine = ct_phantom()
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), path)
    return path


def run_config(configs: list[str], stop_after_epoch: int | None = None, loss_key: str = "loss", **overrides):
    """Parse ``configs/<name>`` files with ``overrides``, run ``initialize`` and ``run`` in-process, and return
    the trainer, the per-iteration ``loss_key`` values and the parser. ``stop_after_epoch`` interrupts the run
    after that epoch's checkpoint, as a crash would."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / c) for c in configs])
    parser.update({"bundle_root": str(ROOT), **overrides})
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs name configs/common.json relative to the bundle root
    try:
        parser.parse()
        trainer = parser.get_parsed_content("train#trainer")
        losses: list[float] = []
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0][loss_key]))
        )
        if stop_after_epoch:
            trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after_epoch), lambda e: e.terminate())
        parser.get_parsed_content("initialize")
        parser.get_parsed_content("run")
    finally:
        os.chdir(cwd)
    return trainer, losses, parser


def tracking(store: Path) -> list[str]:
    """Command-line options for MONAI's built-in MLflow tracking into a local store (SQLite: MONAI 1.6.1's
    MLFlowHandler refuses MLflow's deprecated ``file:`` store)."""
    return ["--tracking", "mlflow", "--tracking_uri", f"sqlite:///{store}"]


def monai_bundle(config_files: str, *args: str, run_id: str = "run") -> subprocess.CompletedProcess:
    """``python -m monai.bundle run [run_id] --config_file CONFIG_FILES ARGS`` from the bundle root."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_files, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def train_tiny(
    config: str, datalist: Path, ckpt_dir: Path, output_dir: Path, *args: str
) -> subprocess.CompletedProcess:
    """``monai.bundle run training`` of ``configs/<config>`` + tiny.json for one epoch on ``datalist``."""
    files = f"['configs/{config}','configs/tiny.json']"
    args = ("--datalist", str(datalist), "--ckpt_dir", str(ckpt_dir), "--output_dir", str(output_dir), *args)
    return monai_bundle(files, *args, "--max_epochs", "1", run_id="training")


def tracked_training(config: str, crops: Path, tmp_path: Path) -> tuple:
    """``train_tiny`` on the crops, tracked by MLflow into ``tmp_path/mlruns.db``: the single run and its artifact
    names."""
    res = train_tiny(
        config, crops / "datalist.json", tmp_path / "ckpt", tmp_path / "out", *tracking(tmp_path / "mlruns.db")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return mlflow_record(tmp_path / "mlruns.db")


def mlflow_record(store: Path):
    """The single MLflow run in a local SQLite store, and the file names of its artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, f"{len(runs)} MLflow runs in {store}"
    return runs[0], {Path(a.path).name for a in client.list_artifacts(runs[0].info.run_id)}


def torchrun(config_files: str, *args: str, nproc: int = 2, run_id: str = "training"):
    """``torchrun --nproc_per_node=nproc -m monai.bundle run <run_id>`` on the CPU (gloo), from the bundle root."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [exe, f"--nproc_per_node={nproc}", "-m", "monai.bundle", "run", run_id, "--config_file", config_files, *args]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


@pytest.fixture(scope="session")
def crops(tmp_path_factory) -> Path:
    """Three 64x64x16 crops of the committed real CT sample and a datalist."""
    root = tmp_path_factory.mktemp("crops")
    img = nib.load(SAMPLE)
    v, a = np.asarray(img.dataobj), img.affine
    for name, (x0, y0) in {"a": (40, 60), "b": (120, 60), "c": (80, 120)}.items():
        aff = a.copy()
        aff[:3, 3] = (a @ np.array([x0, y0, 4, 1]))[:3]
        nib.save(nib.Nifti1Image(v[x0 : x0 + 64, y0 : y0 + 64, 4:20], aff), root / f"{name}.nii.gz")
    dl = {"training": [{"image": "a.nii.gz"}, {"image": "b.nii.gz"}], "validation": [{"image": "c.nii.gz"}]}
    (root / "datalist.json").write_text(json.dumps(dl))
    return root


@pytest.fixture(scope="session")
def trained(crops, tmp_path_factory):
    """Stage 1 trained for 3 tiny epochs on the crops: (ckpt_dir, trainer, l1 losses, parser)."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    trainer, losses, parser = run_config(
        ["train_autoencoder.json", "tiny.json"],
        None,
        "l1",
        datalist=str(crops / "datalist.json"),
        ckpt_dir=str(ckpt),
        output_dir=str(ckpt / "tb"),
        max_epochs=3,
    )
    return ckpt, trainer, losses, parser


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """Tiny autoencoder, prior and ControlNet weights in one ckpt_dir (untrained: the contract, not quality)."""
    ckpt = tmp_path_factory.mktemp("models")
    tiny = ConfigParser(json.loads((ROOT / "configs" / "tiny.json").read_text()))
    import torch

    torch.manual_seed(0)
    for name in ("autoencoder", "diffusion", "controlnet"):
        torch.save(tiny.get_parsed_content(f"{name}_def").state_dict(), ckpt / f"{name}.pt")
    (ckpt / "autoencoder_scale.json").write_text(json.dumps({"scale_factor": 1.2}))
    return ckpt
