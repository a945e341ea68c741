"""A live MONAI Label server (its own environment, ``make label-server``) serving the enhancement with tiny weights:
``/info/`` lists the task and ``POST /infer/enhance`` returns the enhanced volume, called as a client would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from tests.conftest import ROOT

TINY = json.loads((ROOT / "configs" / "tiny.json").read_text())

LABEL_ENV = ROOT / ".venv-label"
pytestmark = pytest.mark.skipif(
    not (LABEL_ENV / "bin" / "monailabel").exists(),
    reason="no MONAI Label server environment: run `make label-server` (creates .venv-label)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post_form(url: str, fields: dict[str, str]) -> tuple[int, bytes]:
    """A multipart/form-data POST (MONAI Label reads the request's ``params`` as a form field)."""
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        + f"--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _start(studies: Path, ckpt_dir: Path, port: int, log: Path, configs: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PATH": f"{LABEL_ENV / 'bin'}:{os.environ['PATH']}",
        "MONAILABEL_PYEXE": str(LABEL_ENV / "bin" / "python"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)
    cmd = [str(LABEL_ENV / "bin" / "monailabel"), "start_server", "--app", str(ROOT / "scripts" / "label_app")]
    cmd += ["--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    for key, value in {"ckpt_dir": str(ckpt_dir), "network_configs": configs, "device": "cpu"}.items():
        cmd += ["--conf", key, value]
    with log.open("w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until_up(server: subprocess.Popen, url: str, log: Path, seconds: float = 180.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            return _get(url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1.0)
    pytest.fail(f"no answer from {url} within {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    """Stop the launcher and the uvicorn process it starts (one process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.parametrize("method", ["diffusion", "regression", "no weights"])
def test_a_live_server_enhances_the_opened_image(crops, weights, tmp_path, method):
    """The main job's latent chain (tiny weights, ``--conf network_configs configs/inference_diffusion.json,...``),
    its default regression stage (the shipped kind of weights), and a task without weights."""
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(crops / "c.nii.gz", studies / "c.nii.gz")
    ckpt, configs, with_weights = weights, "configs/inference_diffusion.json,configs/tiny.json", method != "no weights"
    if method == "regression":
        ckpt, configs = tmp_path / "models", "configs/tiny.json"
        ckpt.mkdir()
        torch.save(ConfigParser(TINY).get_parsed_content("regression_def").state_dict(), ckpt / "model.pt")
    elif not with_weights:
        ckpt = tmp_path / "no_weights"
    port, log = _free_port(), tmp_path / "server.log"
    server = _start(studies, ckpt, port, log, configs)
    try:
        info = _wait_until_up(server, f"http://127.0.0.1:{port}/info/", log)
        params = json.dumps({"target_spacing": "1.1406,1.1406,2.5", "num_inference_steps": 1})
        status, body = _post_form(f"http://127.0.0.1:{port}/infer/enhance?image=c&output=image", {"params": params})
        if not with_weights:  # the task is not offered; the request is answered with the reason
            assert "enhance" not in info.get("models", {})
            assert status == 422 and b"no_weights/autoencoder.pt: no autoencoder weights" in body, body
            return
            return
        assert "enhance" in info["models"], info
        assert status == 200, body[-2000:]
        out = tmp_path / "enhanced.nii.gz"
        out.write_bytes(body)
        img, ref = nib.load(out), nib.load(crops / "c.nii.gz")
        assert img.shape == (64, 64, 32) and img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.header.get_zooms(), (1.1406, 1.1406, 2.5), atol=1e-3)
        corner = [0, 0, -0.5, 1]  # the slab edge: the field of view is kept
        np.testing.assert_allclose((img.affine @ corner)[:3], (ref.affine @ corner)[:3], atol=1e-3)
        hu = np.asarray(img.dataobj)
        assert -1100 <= hu.min() and hu.max() <= 3100 and hu.std() > 10
    finally:
        _stop(server)


def test_dicom_output_round_trips_on_the_servers_pydicom():
    """The server's environment has pydicom 2 (pydicom-seg needs it): a series written by scripts.dicom reads back
    with the same values and affine there too."""
    script = """
import sys, tempfile, pathlib
import numpy as np, pydicom, torch
from scripts.dicom import new_template, read_series, write_series
vol = torch.tensor(np.random.default_rng(0).integers(-1000, 1000, (16, 12, 5)).astype(np.float32))
aff = np.diag([0.8, 0.7, 2.5, 1.0]); aff[:3, 3] = [10, -20, 30]
out = pathlib.Path(tempfile.mkdtemp()) / "series"
write_series(vol, aff, new_template("CT"), out)
back = read_series(out)
assert np.array_equal(back.as_tensor()[0].numpy(), vol.numpy()) and np.allclose(np.asarray(back.affine), aff)
print(pydicom.__version__)
"""
    res = subprocess.run(
        [str(LABEL_ENV / "bin" / "python"), "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().startswith("2.")
