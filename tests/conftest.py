"""Shared fixtures: small synthetic phantoms, written volumes, and the repository root on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
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


@pytest.fixture
def phantom_file(tmp_path: Path) -> Path:
    vol, affine = ct_phantom()
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), path)
    return path
