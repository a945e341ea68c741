"""Score output volumes against ground truth: a JSON and CSV report, and PNG montages per case.

Each case is ``{"name": ..., "output": path, "reference": path, "input": optional path, "method": optional}``.
Output and reference must share one grid (same shape and affine); an input on another grid (thick slices)
is interpolated onto it for the montage only.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from scripts.baselines import resample
from scripts.figures import montage
from scripts.metrics import CT_WINDOW, mr_scale, score
from scripts.options import flag
from scripts.volumes import VolumeError, load_volume, spacing_of

logger = logging.getLogger(__name__)


def read_cases(cases: str | list[dict]) -> list[dict]:
    """Cases from a list or from a JSON file holding a list (or ``{"cases": [...]}``)."""
    if isinstance(cases, str | Path):
        with open(cases) as f:
            loaded = json.load(f)
        cases = loaded["cases"] if isinstance(loaded, dict) else loaded
    if not cases:
        raise ValueError("no cases to evaluate")
    for c in cases:
        missing = {"output", "reference"} - set(c)
        if missing:
            raise ValueError(f"case {c} lacks {sorted(missing)}")
    return list(cases)


def display_window(reference: np.ndarray, modality: str) -> tuple[float, float]:
    """Grey-level window for montages: a lung-and-soft-tissue window for CT, 0..99.5th percentile for MR."""
    return (-1000.0, 600.0) if modality == "ct" else (0.0, mr_scale(reference))


def evaluate(cases: str | list[dict], output_dir: str, modality: str = "ct", montages: bool = True) -> dict:
    """Score every case, write ``report.json``, ``report.csv`` and ``<name>.png`` into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, case in enumerate(read_cases(cases)):
        name = str(case.get("name", f"case{i}"))
        pred, ref = load_volume(case["output"]), load_volume(case["reference"])
        if pred.shape != ref.shape or not np.allclose(np.asarray(pred.affine), np.asarray(ref.affine), atol=1e-3):
            raise VolumeError(
                f"{case['output']}: grid {tuple(pred.shape[1:])} spacing {spacing_of(pred.affine).round(4).tolist()} "
                f"does not match reference {case['reference']} {tuple(ref.shape[1:])} "
                f"spacing {spacing_of(ref.affine).round(4).tolist()}"
            )
        row = {"name": name, "method": case.get("method", ""), **score(pred, ref, modality)}
        rows.append(row)
        logger.info("%s %s", name, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
        if flag(montages, "montages"):
            panels = {}
            if "input" in case:
                inp = load_volume(case["input"])
                if inp.shape != ref.shape:
                    inp, _ = resample(inp, np.asarray(inp.affine), spacing_of(ref.affine), "trilinear")
                panels["input"] = inp
            panels.update({"output": pred, "reference": ref})
            montage(
                panels,
                np.asarray(ref.affine),
                out / f"{name}.png",
                display_window(ref.numpy(), modality),
                difference=("output", "reference"),
                title=f"{name} ({row['method'] or 'output'})",
            )
    summary = defaultdict(list)
    for r in rows:
        summary[r["method"]].append(r)
    means = {
        m: {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if isinstance(rs[0][k], float)}
        for m, rs in summary.items()
    }
    report = {
        "modality": modality,
        "ct_window": CT_WINDOW if modality == "ct" else None,
        "cases": rows,
        "mean_by_method": means,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return report
