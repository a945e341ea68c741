"""Datalists in the Auto3DSeg / Medical Segmentation Decathlon JSON format, split by patient.

``python -m scripts.datalist make IMAGES_DIR datalist.json [--patient_pattern REGEX] [--val_fraction 0.2]``
writes ``training`` (with ``fold``), ``validation`` and ``testing`` lists in which no patient appears twice.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def find_images(images_dir: str | Path) -> list[Path]:
    """Image files directly in ``images_dir`` and DICOM series folders below it."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    found = [p for p in sorted(root.iterdir()) if p.is_file() and p.name.endswith(IMAGE_SUFFIXES)]
    found += [p for p in sorted(root.iterdir()) if p.is_dir() and any(f.suffix == ".dcm" for f in p.rglob("*"))]
    if not found:
        raise FileNotFoundError(f"{root}: no images (NIfTI, NRRD, MHA or DICOM folders)")
    return found


def patient_of(image: Path, patient_pattern: str | None = None) -> str:
    """Patient of an image: regex group ``patient`` (or group 1) of the file name, DICOM PatientID, or the stem."""
    if patient_pattern:
        m = re.search(patient_pattern, image.name)
        if not m:
            raise ValueError(f"{image}: file name does not match patient_pattern {patient_pattern!r}")
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
        raise ValueError(f"{len(patients)} patients are too few for val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}")

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
        "validation": entries(patients[n_test:n_test + n_val], False),
        "training": entries(patients[n_test + n_val:], True),
    }
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(datalist, indent=2))
    return datalist


def read_datalist(
    path: str, key: str = "training", base_dir: str | None = None, path_keys: Sequence[str] = ("image",)
) -> list[dict]:
    """Entries of ``key`` with absolute paths (``path_keys`` and ``label``, relative to ``dataroot`` or the file's
    folder); a clear error for a missing file, key, list or path."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: datalist not found")
    with open(p) as f:
        raw = json.load(f)
    if not raw.get(key):
        raise ValueError(f"{p}: the '{key}' list is missing or empty")
    base = base_dir or raw.get("dataroot") or str(p.parent)
    items = load_decathlon_datalist(str(p), is_segmentation=False, data_list_key=key, base_dir=base)
    for item in items:
        for k in path_keys:
            if k not in item:
                raise ValueError(f"{p}: an entry of '{key}' has no '{k}': {item}")
            if not Path(item[k]).is_absolute():
                item[k] = str(Path(base) / item[k])
            if not Path(item[k]).exists():
                raise FileNotFoundError(f"{p}: {k} {item[k]} listed in '{key}' does not exist")
    return items


def main() -> None:
    import fire

    fire.Fire({"make": make_datalist})


if __name__ == "__main__":
    main()
