"""Invertible intensity normalisation for the networks, recorded per image so that inference returns HU.

- CT: ``(HU - CT_OFFSET) / CT_SCALE`` with the documented window -1000..1000 HU mapped to 0..1, *without*
  clipping, so bone above 1000 HU survives and the map inverts exactly.
- MR: ``value / p99.5`` (the image's own 99.5th percentile) mapped to 0..1, also without clipping.

``NormalizeIntensityd`` stores ``{"modality", "offset", "scale"}`` under ``<key>_intensity``; ``denormalize``
undoes it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scripts.metrics import MR_PERCENTILE

CT_OFFSET, CT_SCALE = -1000.0, 2000.0


def intensity_params(img: torch.Tensor, modality: str) -> dict:
    """Offset and scale that bring ``img`` to about 0..1 for ``modality`` ('ct' or 'mr')."""
    modality = modality.lower()
    if modality == "ct":
        return {"modality": "ct", "offset": CT_OFFSET, "scale": CT_SCALE}
    if modality == "mr":
        values = torch.as_tensor(img).float().flatten()
        scale = float(torch.quantile(values[:: max(1, values.numel() // 1_000_000)], MR_PERCENTILE / 100))
        if scale <= 0:
            raise ValueError("MR image has no positive signal to normalise by")
        return {"modality": "mr", "offset": 0.0, "scale": scale}
    raise ValueError(f"unknown modality {modality!r}; use 'ct' or 'mr'")


def normalize(img: torch.Tensor, params: dict) -> torch.Tensor:
    return (img - params["offset"]) / params["scale"]


def denormalize(img: torch.Tensor, params: dict) -> torch.Tensor:
    return img * params["scale"] + params["offset"]


def item_modality(data: Mapping[Hashable, torch.Tensor], key: Hashable, default: str) -> str:
    """The modality of a data item: its ``modality`` entry (a datalist field), else the Modality that the DICOM
    reader stored in ``data[key]``'s metadata (CT or MR), else ``default``."""
    img = data.get(key)
    meta_modality = str(getattr(img, "meta", {}).get("modality", "")) if img is not None else ""
    return str(data.get("modality") or (meta_modality if meta_modality in ("CT", "MR") else "") or default).lower()


class IntensityParamsd(MapTransform):
    """Record the normalisation parameters of each key's whole image under ``<key>_intensity``, before a crop:
    ``NormalizeIntensityd`` then uses them, so an MR crop is scaled by its volume's percentile (a crop of
    background alone has none of its own)."""

    def __init__(self, keys: KeysCollection, default_modality: str = "ct", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.default_modality = default_modality

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_intensity"] = intensity_params(d[key], item_modality(d, key, self.default_modality))
        return d


class NormalizeIntensityd(MapTransform):
    """Normalise ``keys`` with the parameters of the first key's image (those ``IntensityParamsd`` recorded for
    it, else its own); the modality comes from the item's ``modality`` entry (a datalist field, or DICOM's
    Modality) or from ``default_modality``."""

    def __init__(self, keys: KeysCollection, default_modality: str = "ct", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.default_modality = default_modality

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        params = d.get(f"{keys[0]}_intensity") or intensity_params(
            d[keys[0]], item_modality(d, keys[0], self.default_modality)
        )
        for key in keys:
            d[key] = normalize(d[key], params)
            d[f"{key}_intensity"] = dict(params)
        return d


class ToOriginalUnitsd(MapTransform):
    """Undo ``NormalizeIntensityd`` on ``keys`` with the parameters stored under ``params_key`` (post-processing)."""

    def __init__(
        self, keys: KeysCollection, params_key: str = "image_intensity", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.params_key = params_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        params = {k: float(v) for k, v in d[self.params_key].items() if k in ("offset", "scale")}
        for key in self.key_iterator(d):
            d[key] = denormalize(d[key], params)
        return d
