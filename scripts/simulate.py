"""Make a low-quality volume from a good one with one degradation of known parameters.

The random transforms of ``scripts.degradations`` are used with fixed parameters, so a simulated file and a
training pair come from the same code. Thick slices are written on the thick grid with its affine; the other
degradations keep the grid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from scripts.degradations import (
    DEFAULT_PHOTONS,
    RandBlurd,
    RandKSpaceTruncated,
    RandLowDoseCTd,
    RandRicianNoised,
    RandThickSliced,
)
from scripts.options import flag
from scripts.volumes import load_volume, save_volume

logger = logging.getLogger(__name__)


def build_operator(
    operator: str,
    factor: float = 2.0,
    axis: int = 2,
    profile: str = "box",
    dose_fraction: float = 0.25,
    photons: float = DEFAULT_PHOTONS,
    n_views: int = 360,
    sigma: float = 0.05,
    relative: bool = True,
    kernel: str = "gaussian",
    size_mm: float = 1.0,
):
    """The degradation transform for ``operator`` with every random range collapsed to the given value."""
    key = ["image"]
    ops = {
        "thick_slice": lambda: RandThickSliced(key, (factor, factor), axis, [profile], resample_back=False),
        "lowdose_ct": lambda: RandLowDoseCTd(key, (dose_fraction, dose_fraction), photons, n_views),
        "rician": lambda: RandRicianNoised(key, (sigma, sigma), flag(relative, "relative")),
        "kspace": lambda: RandKSpaceTruncated(key, (factor, factor)),
        "blur": lambda: RandBlurd(key, (size_mm, size_mm), [kernel]),
    }
    if operator not in ops:
        raise ValueError(f"unknown operator {operator!r}; use one of {sorted(ops)}")
    return ops[operator]()


def simulate(
    input_image: str, output_image: str, operator: str, seed: int = 0, dtype: str = "float32", **params
) -> dict:
    """Degrade ``input_image`` into ``output_image`` (NIfTI, written atomically) and a ``.json`` of parameters."""
    image = load_volume(input_image)
    transform = build_operator(operator, **params)
    transform.set_random_state(seed)
    out = transform({"image": image})
    save_volume(out["image"], np.asarray(out["image"].affine), output_image, dtype=dtype)
    record = {
        "input": str(input_image),
        "output": str(output_image),
        "operator": operator,
        "seed": seed,
        "applied": out["degradation"],
    }
    sidecar = Path(str(output_image).removesuffix(".gz").removesuffix(".nii") + ".json")
    sidecar.write_text(json.dumps(record, indent=2))
    logger.info("wrote %s (%s)", output_image, record["applied"])
    return record
