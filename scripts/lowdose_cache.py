"""Low-dose CT noise cached once per training volume and dose level, so that every CT training mix has low dose.

``python -m scripts.lowdose_cache DATALIST OUTPUT_DIR [--doses "[0.1,0.25,0.5]"] [--realizations 1]`` runs the
projection-domain simulation of ``scripts.degradations.lowdose_ct`` (the same code, the same physics) on every CT
volume of ``DATALIST`` (both lists) and stores the noise it adds, in HU, as float16 ``.npy`` beside a
``params.json`` with the parameters and seeds, and ``OUTPUT_DIR/datalist.json``: the datalist whose CT entries
list their realizations under ``lowdose``. Training then loads one realization per draw (``LoadLowDoseNoised``)
and crops it with the image, and ``RandCachedLowDoseCTd`` adds it: seconds of projections per crop become a read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from scripts.datalist import read_datalist
from scripts.degradations import DEFAULT_PHOTONS, RandLowDoseCTd, lowdose_ct
from scripts.volumes import load_volume, spacing_of
from tqdm import tqdm

logger = logging.getLogger(__name__)
NOISE_KEY = "lowdose_noise"


def build_cache(
    datalist: str,
    output_dir: str,
    doses: Sequence[float] = (0.1, 0.25, 0.5),
    realizations: int = 1,
    photons: float = DEFAULT_PHOTONS,
    n_views: int = 360,
    window: str = "ramp",
    seed: int = 0,
) -> dict:
    """Simulate and store the noise of every (CT volume, dose, realization); return the new datalist."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads(Path(datalist).read_text())
    params = {
        "source_datalist": str(Path(datalist).resolve()),
        "doses": [float(d) for d in doses],
        "realizations": int(realizations),
        "photons": float(photons),
        "n_views": int(n_views),
        "window": window,
        "seed": int(seed),
        "files": [],
    }
    new = {**raw, "dataroot": None}
    for key in ("training", "validation"):
        if not raw.get(key):
            continue
        items = read_datalist(datalist, key)
        new[key] = []
        for index, item in enumerate(tqdm(items, desc=f"low-dose cache ({key})")):
            item = {k: v for k, v in item.items() if k != "lowdose"}
            if item.get("modality", "ct") == "ct":
                item["lowdose"] = []
                img = load_volume(item["image"])
                hu, spacing = img.as_tensor()[0].float(), spacing_of(img.affine)
                stem = Path(item["image"]).name.split(".")[0]
                for d in doses:
                    for r in range(int(realizations)):
                        s = (
                            int(seed)
                            + 1000 * index
                            + 100 * r
                            + int(round(1000 * d))
                            + (0 if key == "training" else 500_000)
                        )
                        t = time.time()
                        noise = (
                            lowdose_ct(
                                hu, spacing, float(d), photons, n_views, window, torch.Generator().manual_seed(s)
                            )
                            - hu
                        )
                        path = out / f"{stem}_dose{d:g}_r{r}.npy"
                        np.save(path, noise.numpy().astype(np.float16))
                        item["lowdose"].append({"dose_fraction": float(d), "noise": str(path.resolve())})
                        params["files"].append(
                            {
                                "image": item["image"],
                                "dose_fraction": float(d),
                                "seed": s,
                                "noise": path.name,
                                "seconds": round(time.time() - t, 1),
                            }
                        )
            new[key].append(item)
    (out / "params.json").write_text(json.dumps(params, indent=2))
    (out / "datalist.json").write_text(json.dumps(new, indent=2))
    return new


class LoadLowDoseNoised(Randomizable, MapTransform):
    """Load one cached low-dose noise realization of the item (its ``lowdose`` list) under ``NOISE_KEY``, on the
    image's grid, and its dose under ``NOISE_KEY + '_dose'``; items without a cache pass unchanged."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)

    def randomize(self, data: object = None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        choices = d.get("lowdose") or []
        if not choices:
            return d
        pick = choices[int(self.R.randint(len(choices)))]
        for key in self.key_iterator(d):
            img = d[key]
            noise = torch.from_numpy(np.load(pick["noise"]).astype(np.float32))[None]
            if tuple(noise.shape) != tuple(img.shape):
                raise ValueError(
                    f"{pick['noise']}: noise of shape {tuple(noise.shape)} does not match the image "
                    f"{tuple(img.shape)}; rebuild the cache (python -m scripts.lowdose_cache)"
                )
            d[NOISE_KEY] = MetaTensor(noise, meta=dict(getattr(img, "meta", {})))
            d[NOISE_KEY + "_dose"] = float(pick["dose_fraction"])
        return d


class RandCachedLowDoseCTd(RandLowDoseCTd):
    """Low-dose CT: the cached noise that ``LoadLowDoseNoised`` loaded (cropped with the image), added to
    ``keys``; without a cache, the projection-domain simulation of ``RandLowDoseCTd`` itself."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if NOISE_KEY not in d:
            return super().__call__(d)
        noise = torch.as_tensor(d[NOISE_KEY])
        for key in self.key_iterator(d):
            img = d[key]
            if tuple(img.shape) != tuple(noise.shape):
                raise ValueError(
                    f"cached low-dose noise {tuple(noise.shape)} does not match {key} "
                    f"{tuple(img.shape)}: load and crop it with the image"
                )
            d[key] = img + noise.to(img.dtype)
        d["degradation"] = [
            *d.get("degradation", []),
            {"name": "RandLowDoseCTd", "cached": True, "dose_fraction": d[NOISE_KEY + "_dose"]},
        ]
        return d


def main() -> None:
    import fire

    logging.basicConfig(level=logging.INFO)
    fire.Fire(build_cache)


if __name__ == "__main__":
    main()
