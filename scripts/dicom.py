"""DICOM series to volume (and back), with the geometry checks a PACS export needs.

Reading: slices are grouped by SeriesInstanceUID, ordered by ImagePositionPatient projected on the slice
normal, the slice spacing is taken from those positions (never from SliceThickness), and values are rescaled
with RescaleSlope/RescaleIntercept (HU for CT). A gantry-tilted series is resampled once onto the orthogonal grid
that covers it (``untilt``). Non-uniform spacing, mixed orientations or sizes are refused with an error that says
what was found.

Command line: ``python -m scripts.dicom convert DICOM_DIR OUT.nii.gz [--series_uid UID]`` and
``python -m scripts.dicom list DICOM_DIR``.
"""

from __future__ import annotations

import copy
import datetime
import logging
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from scipy import ndimage
from scripts.errors import OutputExistsError
from scripts.volumes import VolumeError, check_volume, load_volume, save_volume

logger = logging.getLogger(__name__)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_TOLERANCE = 0.01  # relative deviation of a slice gap from the median gap
TILT_TOLERANCE_DEG = 0.5
PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])


def _headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """Every DICOM image header below ``folder``; files that are not DICOM are skipped."""
    found = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError):
            continue
        if "ImagePositionPatient" in ds or "PixelSpacing" in ds or "SeriesInstanceUID" in ds:
            found.append((f, ds))
    return found


def list_series(folder: str | Path) -> dict[str, dict]:
    """Series found in ``folder``: UID -> modality, description, number of files, first file."""
    folder = Path(folder)
    series: dict[str, dict] = defaultdict(lambda: {"files": 0})
    for f, ds in _headers(folder):
        s = series[str(ds.get("SeriesInstanceUID", "unknown"))]
        s["files"] += 1
        s.setdefault("modality", str(ds.get("Modality", "")))
        s.setdefault("description", str(ds.get("SeriesDescription", "")))
        s.setdefault("first_file", str(f))
    return dict(series)


def _describe(series: dict[str, dict]) -> str:
    return "\n".join(f"  {uid}: {s['modality']} '{s['description']}', {s['files']} files" for uid, s in series.items())


def read_series(folder: str | Path, series_uid: str | None = None) -> MetaTensor:
    """Read one DICOM series from ``folder`` as a float32 ``(1, X, Y, Z)`` MetaTensor with a RAS affine.

    With several series in the folder, ``series_uid`` picks one; without it the error lists them all.
    """
    folder = Path(folder)
    headers = _headers(folder)
    if not headers:
        raise VolumeError(f"{folder}: no DICOM image files found")
    by_series: dict[str, list] = defaultdict(list)
    for f, ds in headers:
        by_series[str(ds.get("SeriesInstanceUID", "unknown"))].append((f, ds))
    if series_uid is None:
        if len(by_series) > 1:
            raise VolumeError(
                f"{folder}: holds {len(by_series)} series; choose one with series_uid:\n{_describe(list_series(folder))}"
            )
        series_uid = next(iter(by_series))
    if series_uid not in by_series:
        raise VolumeError(f"{folder}: no series {series_uid}; found:\n{_describe(list_series(folder))}")
    files = by_series[series_uid]
    first = files[0][1]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeError(f"{files[0][0]}: multi-frame (enhanced) DICOM is not supported; export single frames")
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        missing = [str(f) for f, ds in files if key not in ds]
        if missing:
            raise VolumeError(f"{missing[0]}: missing {key}; cannot place the slice in space")
    if len(files) < 2:
        raise VolumeError(f"{folder}: series {series_uid} has a single slice; a 3D volume needs at least two")

    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    for f, ds in files:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise VolumeError(f"{f}: ImageOrientationPatient differs from the rest of series {series_uid}")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise VolumeError(f"{f}: {ds.Rows}x{ds.Columns} pixels, other slices have {first.Rows}x{first.Columns}")
        if not np.allclose([float(v) for v in ds.PixelSpacing], [float(v) for v in first.PixelSpacing], rtol=1e-4):
            raise VolumeError(f"{f}: PixelSpacing differs from the rest of series {series_uid}")

    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in files])
    order = np.argsort(positions @ normal, kind="stable")
    files = [files[i] for i in order]
    positions = positions[order]
    gaps = np.diff(positions @ normal)
    if np.any(gaps < 1e-3):
        k = int(np.argmin(gaps))
        raise VolumeError(f"{files[k + 1][0]}: duplicate slice position (same as {files[k][0]})")
    spacing_z = float(np.median(gaps))
    bad = np.abs(gaps - spacing_z) > SPACING_TOLERANCE * spacing_z
    if np.any(bad):
        k = int(np.argmax(bad))
        raise VolumeError(
            f"{folder}: non-uniform slice spacing in series {series_uid}: gap of {gaps[k]:.3f} mm between "
            f"{files[k][0].name} and {files[k + 1][0].name}, median {spacing_z:.3f} mm (missing slices?); "
            "resample or export the series again"
        )
    steps = np.diff(positions, axis=0)
    cosines = (steps @ normal) / np.linalg.norm(steps, axis=1)
    tilt = float(np.degrees(np.arccos(np.clip(cosines.min(), -1, 1))))

    slices = []
    for f, _ in files:
        try:
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as e:
            raise VolumeError(f"{f}: cannot decode pixel data ({type(e).__name__}: {e})") from e
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(pixels * slope + intercept)
    data = np.stack([s.T for s in slices], axis=-1)  # (columns, rows, slices) = (X, Y, Z)

    row_mm, col_mm = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    origin = positions[0]
    if tilt > TILT_TOLERANCE_DEG:
        data, origin = untilt(data, positions, row_dir, col_dir, col_mm, row_mm)
        logger.info(
            "%s: gantry tilt of %.2f degrees in series %s: resampled (linear, in-plane) onto the orthogonal grid "
            "%s that covers the acquired slices, %.4g x %.4g mm in-plane, %.4g mm slice step along the slice normal",
            folder,
            tilt,
            series_uid,
            "x".join(map(str, data.shape)),
            col_mm,
            row_mm,
            spacing_z,
        )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_mm
    lps[:3, 1] = col_dir * row_mm
    lps[:3, 2] = normal * spacing_z
    lps[:3, 3] = origin
    affine = LPS_TO_RAS @ lps
    check_volume(data, affine, str(folder))
    meta = {
        "affine": torch.as_tensor(affine),
        "original_affine": torch.as_tensor(affine),
        "space": "RAS",
        "modality": str(first.get("Modality", "")),
        "series_uid": series_uid,
        "filename_or_obj": str(folder),
        "gantry_tilt_deg": round(tilt, 3) if tilt > TILT_TOLERANCE_DEG else 0.0,
    }
    return MetaTensor(torch.as_tensor(data)[None], meta=meta)


def untilt(
    data: np.ndarray, positions: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, col_mm: float, row_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """A gantry-tilted (sheared) stack of slices ``(X, Y, Z)``, sorted along the normal, on the orthogonal grid.

    Slice ``k`` sits ``positions[k]`` (LPS); its in-plane offset from the first slice is removed by shifting it back
    (linear interpolation within the slice; along the normal nothing moves, so no slices are mixed). The grid keeps
    the in-plane spacing and grows in-plane to cover every shifted slice; voxels no slice covers take the series'
    minimum (air for CT). Returns the data and the LPS position of the new grid's first voxel.
    """
    offsets = positions - positions[0]
    shift = np.stack([offsets @ row_dir / col_mm, offsets @ col_dir / row_mm], axis=1)  # (Z, 2) in voxels
    lo = np.floor(np.minimum(shift.min(axis=0), 0)).astype(int)
    hi = np.ceil(np.maximum(shift.max(axis=0), 0)).astype(int)
    nx, ny, nz = data.shape
    fill = float(data.min())
    out = np.empty((nx + hi[0] - lo[0], ny + hi[1] - lo[1], nz), dtype=np.float32)
    for k in range(nz):
        canvas = np.full(out.shape[:2], fill, dtype=np.float32)
        canvas[-lo[0] : -lo[0] + nx, -lo[1] : -lo[1] + ny] = data[..., k]
        out[..., k] = ndimage.shift(canvas, shift[k], order=1, mode="constant", cval=fill)
    return out, positions[0] + lo[0] * col_mm * row_dir + lo[1] * row_mm * col_dir


# Tags of the source slice that no longer describe a derived slice on a new grid.
STALE_TAGS = (
    "SliceLocation",
    "GantryDetectorTilt",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "ReferencedImageSequence",
    "SourceImageSequence",
    "WindowCenter",
    "WindowWidth",
    "NumberOfFrames",
    "PixelData",
    "PlanarConfiguration",
    "LossyImageCompression",
)
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def write_file(ds: pydicom.Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file with its file meta header, explicit VR little endian. pydicom 3 takes the
    encoding from the transfer syntax; pydicom 2 (the MONAI Label server's environment) needs it on the dataset."""
    if PYDICOM_MAJOR >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def series_template(folder: str | Path, series_uid: str | None = None) -> pydicom.Dataset:
    """The header (no pixels) of the first slice of a series: its patient and study tags seed a derived series."""
    headers = [
        (f, ds)
        for f, ds in _headers(Path(folder))
        if series_uid is None or str(ds.get("SeriesInstanceUID", "")) == series_uid
    ]
    if not headers:
        raise VolumeError(f"{folder}: no DICOM slice of series {series_uid or '(any)'} to copy tags from")
    return headers[0][1]


def new_template(modality: str) -> pydicom.Dataset:
    """A minimal header for a volume that did not come from DICOM: new (anonymous) patient and study."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.Modality = modality.upper()
    ds.SOPClassUID = SOP_CLASS.get(ds.Modality, SOP_CLASS["CT"])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "ANONYMOUS", "ANONYMOUS", "", ""
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    ds.StudyDate = datetime.date.today().strftime("%Y%m%d")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName, ds.SeriesNumber = "1", "", "", 1
    return ds


def _ds_number(x: float) -> float:
    """A float that fits a DICOM DS element (16 characters) exactly as written."""
    return float(f"{x:.8g}")


def write_series(
    volume: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    template: pydicom.Dataset,
    out_dir: str | Path,
    description: str = "derived",
    integer_values: bool = True,
) -> list[Path]:
    """Write a 3D volume (real units, RAS affine) as single-frame DICOM slices into a new folder ``out_dir``.

    Patient, study and frame-of-reference tags come from ``template``; series and instance UIDs are new,
    ImageType is DERIVED\\SECONDARY, and position, orientation, PixelSpacing and SliceThickness follow the new
    grid. With ``integer_values`` (CT in HU) values are rounded and RescaleSlope/Intercept hold them exactly;
    otherwise the slope spreads the range over 16 bits. The folder appears only once every slice is written.
    """
    vol = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float64)
    vol = vol.reshape(vol.shape[-3:])
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OutputExistsError(f"{out_dir}: the DICOM output folder exists and is not empty")
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    dirs = lps[:3, :3] / spacing
    if integer_values:
        vol = np.rint(vol)
    lo = _ds_number(float(vol.min()))
    span = float(vol.max()) - lo
    slope = max(1.0, float(np.ceil(span / 65535))) if integer_values else _ds_number(max(span, 1e-6) / 65000)
    series_uid = generate_uid()
    base = copy.deepcopy(template)
    for tag in STALE_TAGS:
        if tag in base:
            del base[tag]
    if not hasattr(base, "file_meta"):
        base.file_meta = pydicom.dataset.FileMetaDataset()
    base.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    base.file_meta.MediaStorageSOPClassUID = base.SOPClassUID
    base.SeriesInstanceUID = series_uid
    base.ImageType = ["DERIVED", "SECONDARY"]
    base.SeriesDescription = description
    base.DerivationDescription = description
    base.SeriesDate = datetime.date.today().strftime("%Y%m%d")
    base.ImageOrientationPatient = [_ds_number(v) for v in np.concatenate([dirs[:, 0], dirs[:, 1]])]
    base.PixelSpacing = [_ds_number(spacing[1]), _ds_number(spacing[0])]
    base.SliceThickness = _ds_number(spacing[2])
    base.SpacingBetweenSlices = _ds_number(spacing[2])
    base.Rows, base.Columns = vol.shape[1], vol.shape[0]
    base.BitsAllocated, base.BitsStored, base.HighBit, base.PixelRepresentation = 16, 16, 15, 0
    base.SamplesPerPixel, base.PhotometricInterpretation = 1, "MONOCHROME2"
    base.RescaleSlope, base.RescaleIntercept = slope, lo
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for k in range(vol.shape[2]):
            ds = copy.deepcopy(base)
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [_ds_number(v) for v in (lps[:3, 3] + lps[:3, 2] * k)]
            stored = np.rint((vol[:, :, k].T - lo) / slope).clip(0, 65535).astype(np.uint16)
            ds.add_new(0x7FE00010, "OW", stored.tobytes())
            write_file(ds, tmp / f"slice_{k:04d}.dcm")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(out_dir.iterdir())


def convert(dicom_dir: str, output: str, series_uid: str | None = None, dtype: str = "float32") -> str:
    """Convert one DICOM series to NIfTI, keeping its affine (RAS) and real units."""
    image = load_volume(dicom_dir, series_uid=series_uid)
    return str(save_volume(image, image.affine, output, dtype=dtype))


def main() -> None:
    import fire

    fire.Fire({"convert": convert, "list": lambda dicom_dir: list_series(dicom_dir)})


if __name__ == "__main__":
    main()
