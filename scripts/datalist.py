"""Datalists in the Auto3DSeg / Medical Segmentation Decathlon JSON format, split by patient or by region.

``python -m scripts.datalist make IMAGES_DIR datalist.json [--patient_pattern REGEX] [--val_fraction 0.2]``
writes ``training`` (with ``fold``), ``validation`` and ``testing`` lists in which no patient appears twice.

``python -m scripts.datalist regions DATA_DIR OUTPUT_DIR`` holds out a slab of every volume instead, for data
with too few patients to split (the development volumes in ``../shared/data``).

``python -m scripts.datalist release DATA_DIR datalist.json`` writes the release split of ``../shared/data`` by
volume (``RELEASE_VALIDATION``).

``python -m scripts.datalist fill datalist.json --patch_size "[128,128,32]"`` says how much of a training patch
each volume fills, the rest being padding.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist
from scripts.errors import InputError, MissingFileError
from scripts.metrics import MR_MASK_FRACTION, body_mask, mr_scale
from scripts.volumes import load_volume, save_volume, spacing_of

logger = logging.getLogger(__name__)

DEVELOPMENT_VOLUMES = {"lung1_image.nrrd": "ct", "brain1_image.nrrd": "mr", "mni152_t1_1mm.nii.gz": "mr"}
# The release split of ../shared/data, by volume: two IBSI patients (CT and MR), the 5 mm chest CT (the demo
# sample's source, so the demo runs on held-out anatomy) and the child-brain MPRAGE (near-1 mm MR) are validation.
RELEASE_VALIDATION = (
    "lung1_image.nrrd",
    "ibsi_sts011_ct.nii.gz",
    "ibsi_sts011_mr_t1.nii.gz",
    "ibsi_sts012_ct.nii.gz",
    "ibsi_sts012_mr_t1.nii.gz",
    "mr_t1_brain_child3y_saganon.nii.gz",
)
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def find_images(images_dir: str | Path) -> list[Path]:
    """Image files directly in ``images_dir`` and DICOM series folders below it."""
    root = Path(images_dir)
    if not root.is_dir():
        raise MissingFileError(f"{root}: not a directory")
    found = [p for p in sorted(root.iterdir()) if p.is_file() and p.name.endswith(IMAGE_SUFFIXES)]
    found += [p for p in sorted(root.iterdir()) if p.is_dir() and any(f.suffix == ".dcm" for f in p.rglob("*"))]
    if not found:
        raise MissingFileError(f"{root}: no images (NIfTI, NRRD, MHA or DICOM folders)")
    return found


def patient_of(image: Path, patient_pattern: str | None = None) -> str:
    """Patient of an image: regex group ``patient`` (or group 1) of the file name, DICOM PatientID, or the stem."""
    if patient_pattern:
        m = re.search(patient_pattern, image.name)
        if not m:
            raise InputError(f"{image}: file name does not match patient_pattern {patient_pattern!r}")
        return m.group("patient") if "patient" in m.re.groupindex else m.group(1 if m.re.groups else 0)
    if image.is_dir():
        import pydicom

        first = next(f for f in sorted(image.rglob("*.dcm")))
        return str(pydicom.dcmread(first, stop_before_pixels=True).get("PatientID", image.name))
    return image.name.split(".")[0]


def make_datalist(
    images_dir: str,
    output: str,
    patient_pattern: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    num_folds: int = 5,
    seed: int = 0,
) -> dict:
    """Split the images of ``images_dir`` by patient and write an Auto3DSeg datalist to ``output``.

    Paths are relative to ``dataroot`` (``images_dir``), which is stored in the file. Training entries carry a
    ``fold`` assigned per patient, so cross-validation folds never share a patient either.
    """
    root = Path(images_dir).resolve()
    by_patient: dict[str, list[Path]] = defaultdict(list)
    for img in find_images(root):
        by_patient[patient_of(img, patient_pattern)].append(img)
    patients = sorted(by_patient)
    np.random.RandomState(seed).shuffle(patients)
    n_test = int(round(test_fraction * len(patients)))
    n_val = int(round(val_fraction * len(patients)))
    if len(patients) - n_test - n_val < 1:
        raise InputError(
            f"{len(patients)} patients are too few for val_fraction={val_fraction}, " f"test_fraction={test_fraction}"
        )

    def entries(group: list[str], with_fold: bool) -> list[dict]:
        out = []
        for i, pid in enumerate(group):
            for img in by_patient[pid]:
                e = {"image": str(img.relative_to(root)), "patient": pid}
                if with_fold:
                    e["fold"] = i % max(1, num_folds)
                out.append(e)
        return out

    datalist = {
        "name": root.name,
        "dataroot": str(root),
        "testing": entries(patients[:n_test], False),
        "validation": entries(patients[n_test : n_test + n_val], False),
        "training": entries(patients[n_test + n_val :], True),
    }
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(datalist, indent=2))
    return datalist


def split_regions(
    data_dir: str,
    output_dir: str,
    volumes: dict[str, str] | None = None,
    val_fraction: float = 0.25,
    gap_mm: float = 20.0,
) -> dict:
    """Hold out the top ``val_fraction`` of the anatomy (along the third axis) of every volume for validation.

    The anatomy's extent is the run of slices where the body (CT) or head (MR) mask of ``scripts.metrics`` covers
    at least 2 % of the slice, so an empty margin (the MNI template's) is not counted as validation data. A band
    of ``gap_mm`` between the two slabs belongs to neither, so training and validation patches never share
    anatomy; slices above the anatomy are dropped. The slabs are written to ``output_dir`` as NIfTI (the affine
    keeps their world position) with ``datalist.json`` (``training``/``validation``, each entry with its
    ``modality``). ``volumes`` maps file names in ``data_dir`` to modalities; by default the development volumes.
    """
    volumes = volumes or DEVELOPMENT_VOLUMES
    out = Path(output_dir)
    datalist: dict = {
        "name": "regions",
        "dataroot": str(out.resolve()),
        "training": [],
        "validation": [],
        "split": {"val_fraction": val_fraction, "gap_mm": gap_mm},
    }
    for name, modality in volumes.items():
        img = load_volume(Path(data_dir) / name)
        v, affine = img.as_tensor()[0], np.asarray(img.affine)
        dz = float(spacing_of(affine)[2])
        mask = body_mask(v) if modality == "ct" else body_mask(v, MR_MASK_FRACTION * mr_scale(v))
        occupied = np.flatnonzero(mask.mean(axis=(0, 1)) >= 0.02)
        n = int(occupied[-1]) + 1 if occupied.size else v.shape[2]
        n_val = max(1, int(round(val_fraction * (n - (int(occupied[0]) if occupied.size else 0)))))
        n_gap = int(np.ceil(gap_mm / dz))
        n_train = n - n_val - n_gap
        if n_train < 1:
            raise InputError(
                f"{name}: {n} slices of {dz} mm are too few for val_fraction={val_fraction}, " f"gap_mm={gap_mm}"
            )
        stem = name.split(".")[0]
        for key, start, stop in (("training", 0, n_train), ("validation", n - n_val, n)):
            slab_affine = affine.copy()
            slab_affine[:3, 3] = (affine @ np.array([0.0, 0.0, start, 1.0]))[:3]
            dtype = "int16" if modality == "ct" else "float32"
            save_volume(v[:, :, start:stop], slab_affine, out / f"{stem}_{key}.nii.gz", dtype=dtype)
            datalist[key].append(
                {"image": f"{stem}_{key}.nii.gz", "modality": modality, "source": name, "slices": [start, stop]}
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "datalist.json").write_text(json.dumps(datalist, indent=2))
    return datalist


def modality_of(name: str) -> str:
    """CT or MR from a file name of ``../shared/data`` (``*_ct.*``, ``lung1``; everything else is MR)."""
    return "ct" if re.search(r"(_ct\.|^lung)", name) else "mr"


def split_release(
    data_dir: str,
    output: str,
    validation: Sequence[str] = RELEASE_VALIDATION,
    keep_validation: Sequence[str] | None = None,
) -> dict:
    """The release split of ``data_dir`` by volume (``validation`` by file name, every other image training),
    each entry with its ``modality``, written to ``output`` with an absolute ``dataroot``. ``keep_validation``
    lists only some validation volumes (the others are left out, not trained on): a cheaper validation during
    training."""
    root = Path(data_dir).resolve()
    names = [p.name for p in find_images(root)]
    missing = sorted(set(validation) - set(names))
    if missing:
        raise MissingFileError(f"{root}: validation volumes not found: {missing}")
    datalist: dict = {"name": "release", "dataroot": str(root), "training": [], "validation": []}
    for name in names:
        key = "validation" if name in validation else "training"
        if key == "validation" and keep_validation is not None and name not in keep_validation:
            continue
        datalist[key].append({"image": name, "modality": modality_of(name)})
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(datalist, indent=2))
    return datalist


def only_modalities(entries: list[dict], modalities: Sequence[str] | None, default: str | None = None) -> list[dict]:
    """The entries of ``modalities`` (an entry without a ``modality`` key has ``default``); all for ``None``. A
    specialist trained on one modality (``configs/train_restoration.json``) reads its volumes from a mixed list."""
    if modalities is None:
        return entries
    kept = [e for e in entries if e.get("modality", default) in modalities]
    if not kept:
        raise InputError(f"no {'/'.join(modalities)} volume in the datalist ({len(entries)} entries)")
    return kept


def read_datalist(
    path: str, key: str = "training", base_dir: str | None = None, path_keys: Sequence[str] = ("image",)
) -> list[dict]:
    """Entries of ``key`` with absolute paths (``path_keys`` and ``label``, relative to ``dataroot`` or the file's
    folder); a clear error for a missing file, key, list or path.

    A relative ``dataroot`` is taken from the file's folder, and one that does not exist on this machine (a
    datalist copied with its data to another machine) falls back to that folder, with a warning."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p}: datalist not found")
    with open(p) as f:
        raw = json.load(f)
    if not raw.get(key):
        raise InputError(f"{p}: the '{key}' list is missing or empty")
    base = base_dir or raw.get("dataroot") or str(p.parent)
    if not base_dir and raw.get("dataroot"):
        base = str(p.parent / base)  # an absolute dataroot stays as it is
        if not Path(base).is_dir():
            logger.warning("%s: dataroot %s not found; paths are read from the datalist's folder", p, base)
            base = str(p.parent)
    items = load_decathlon_datalist(str(p), is_segmentation=False, data_list_key=key, base_dir=base)
    for item in items:
        for k in path_keys:
            if k not in item:
                raise InputError(f"{p}: an entry of '{key}' has no '{k}': {item}")
            if not Path(item[k]).is_absolute():
                item[k] = str(Path(base) / item[k])
            if not Path(item[k]).exists():
                raise MissingFileError(f"{p}: {k} {item[k]} listed in '{key}' does not exist")
    return items


def patch_fill(datalist: str, patch_size: Sequence[int], key: str = "training") -> dict[str, tuple]:
    """Shape of each volume of ``key`` and the share of a ``patch_size`` patch that it fills with data. Along an
    axis where a volume is smaller than the patch every patch is padded (with air for training pairs, with the
    edge for the prior's latents): compute spent on padding, and a boundary the networks learn that real data
    lack."""
    fills = {}
    for item in read_datalist(datalist, key):
        shape = tuple(load_volume(item["image"]).shape[1:])
        fills[Path(item["image"]).name] = (shape, float(np.prod([min(1.0, s / p) for s, p in zip(shape, patch_size)])))
    return fills


def print_patch_fill(datalist: str, patch_size: Sequence[int], key: str = "training") -> None:
    """``python -m scripts.datalist release DATA_DIR datalist.json`` writes the release split of ``../shared/data`` by
    volume (``RELEASE_VALIDATION``).

    ``python -m scripts.datalist fill``: ``patch_fill`` as a table."""
    fills = patch_fill(datalist, patch_size, key)
    for name, (shape, fill) in fills.items():
        print(f"{name:<36} {str(shape):<18} fill {fill:.2f}")
    print(f"mean fill of a {tuple(patch_size)} patch over '{key}': {np.mean([f for _, f in fills.values()]):.2f}")


def main() -> None:
    import fire

    fire.Fire({"make": make_datalist, "regions": split_regions, "release": split_release, "fill": print_patch_fill})


if __name__ == "__main__":
    main()
