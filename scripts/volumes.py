"""Reading, checking and atomically writing 3D volumes with their world geometry (RAS affine)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform
from scripts.errors import InputError, MissingFileError


class VolumeError(InputError):
    """An input volume that cannot be used; the message names the file and the reason."""


def spacing_of(affine: np.ndarray | torch.Tensor) -> np.ndarray:
    """Voxel size in mm along each array axis: the column norms of the affine's 3x3 part."""
    a = np.asarray(affine, dtype=np.float64)
    return np.linalg.norm(a[:3, :3], axis=0)


def check_volume(data: np.ndarray | torch.Tensor, affine: np.ndarray | torch.Tensor, source: str) -> None:
    """Raise ``VolumeError`` unless ``data`` is one finite 3D volume (optionally one channel) on a valid grid."""
    shape = tuple(data.shape)
    spatial = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
    if len(spatial) != 3:
        raise VolumeError(f"{source}: expected a 3D volume, got data of shape {shape}")
    if min(spatial) < 1:
        raise VolumeError(f"{source}: empty volume of shape {shape}")
    values = torch.as_tensor(data)
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise VolumeError(f"{source}: {bad} voxels are NaN or Inf")
    sp = spacing_of(affine)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 1e-6):
        raise VolumeError(f"{source}: invalid voxel spacing {sp.round(6).tolist()} (zero or non-finite)")
    if abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) < 1e-9:
        raise VolumeError(f"{source}: singular affine (axes are not independent)")


def load_volume(path: str | os.PathLike, series_uid: str | None = None) -> MetaTensor:
    """Load a NIfTI/NRRD file or a DICOM series directory as a float32 ``(1, X, Y, Z)`` MetaTensor.

    The affine is RAS (MONAI's convention), so an LPS NRRD or DICOM comes out with its axes flipped
    accordingly. DICOM values are rescaled to their real units (HU for CT). Any problem raises
    ``VolumeError`` (or ``FileNotFoundError``) naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file or directory")
    if path.is_dir():
        from scripts.dicom import read_series

        image = read_series(path, series_uid=series_uid)
    else:
        try:
            image = LoadImage(image_only=True, ensure_channel_first=False, dtype=np.float32)(str(path))
        except Exception as e:  # readers raise many types for corrupt, truncated or foreign files
            raise VolumeError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from e
        if image.ndim == 3:
            image = image[None]
        elif image.ndim == 4 and image.shape[-1] == 1:  # a 4D NIfTI with a single time point
            image = image[..., 0][None]
    check_volume(image, image.affine, str(path))
    image.meta["filename_or_obj"] = str(path)
    return image


def save_volume(
    data: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    dtype: str | np.dtype = "float32",
) -> Path:
    """Write a 3D volume (or ``(1, X, Y, Z)``) to NIfTI atomically: a temporary file is renamed into place.

    Integer dtypes are rounded and clipped to their range, so HU survive as int16. The source is never touched;
    after a failure no partial file is left at ``path``.
    """
    path = Path(path)
    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    aff = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    check_volume(arr, aff, str(path))
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    img = nib.Nifti1Image(arr.astype(dtype), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix or ".nii.gz"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class LoadVolumed(MapTransform):
    """``load_volume`` as a dictionary transform: files or DICOM folders, checked, RAS, float32 ``(1, X, Y, Z)``.

    Unlike ``LoadImaged`` it refuses 2D/4D data, NaN and bad spacings with an error naming the file.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_volume(d[key])
        return d
