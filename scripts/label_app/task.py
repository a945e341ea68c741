"""A MONAI Label infer task that runs this bundle's main job on the image a user opened.

MONAI Label's stock ``BundleInferTask`` expects a segmentation bundle (pre-transforms, a network, a label
writer), so this task implements ``InferTask`` itself and calls ``scripts.enhance.enhance``: the same pipeline,
configs and weights as ``configs/inference.json``. The app that serves it is ``scripts/label_app/main.py``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from scripts.enhance import ROOT, enhance, inference_parser
from scripts.errors import InputError, user_error
from scripts.options import flag

logger = logging.getLogger(__name__)


class EnhanceTask(InferTask):
    """Enhance the opened volume; the result is a NIfTI volume in the input's units (not a label map).

    Request keys (all optional, defaults in ``config()``): ``target_spacing`` ("sx,sy,sz" in mm, empty for the
    input's), ``modality`` (ct|mr), ``degradation`` (noise|kspace|blur: picks the same-grid network),
    ``kernel`` (gaussian|box) and ``sigma_mm`` (its sigma or width) for ``blur``, ``kspace_factor`` (the truncation
    factor, if known, for ``kspace``), ``num_inference_steps``, ``seed``.
    """

    def __init__(
        self,
        ckpt_dir: str | None = None,
        config_files: tuple[str, ...] = ("configs/inference.json",),
        device: str | None = None,
    ) -> None:
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description="CT/MR enhancement (denoising, through-plane super-resolution)",
            config={
                "target_spacing": "",
                "modality": "",
                "degradation": "noise",
                "kernel": "gaussian",
                "sigma_mm": 1.0,
                "kspace_factor": "",
                "num_inference_steps": 20,
                "seed": 0,
            },
        )
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else ROOT / "models"
        self.config_files, self.device = config_files, device
        self._parser = None  # parsed on the first request, then reused

    def is_valid(self) -> bool:
        """Whether the weights are there and load into the configured networks (the reason is logged if not)."""
        try:
            self._networks_and_settings()
        except Exception as e:  # MONAI's config parser wraps what the loaders raise
            if user_error(e) is None:
                raise
            logger.error("enhance task unavailable: %s", user_error(e))
            return False
        return True

    def _networks_and_settings(self) -> tuple[dict, dict, str, dict]:
        if self._parser is None:
            overrides = {"ckpt_dir": str(self.ckpt_dir)}
            if self.device:
                overrides["device"] = self.device
            self._parser = inference_parser(self.config_files, **overrides)
        p = self._parser  # parsed content is cached by the parser: the networks load once
        options = {
            "method": str(p["method"]),  # the main job's (regression; configs/inference_diffusion.json: latent)
            "strength": float(p["strength"]),
            "residual_decoding": flag(p["residual_decoding"], "residual_decoding"),
            "consistency": flag(p["data_consistency"], "data_consistency"),
        }
        return (
            p.get_parsed_content("networks"),
            p.get_parsed_content("sliding_window"),
            p.get_parsed_content("device"),
            options,
        )

    def __call__(self, request: dict) -> tuple[str, dict]:
        params = {**self.config(), **request}
        spacing = str(params.get("target_spacing") or "").strip("[] ")
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        try:
            networks, sliding_window, device, options = self._networks_and_settings()
            try:
                target = [float(v) for v in spacing.split(",")] if spacing else None
            except ValueError as e:
                raise InputError(f"target_spacing: expected 'sx,sy,sz' in mm, got {spacing!r}") from e
            try:
                sigma_mm = float(params.get("sigma_mm") or 1.0)
                kspace_factor = float(params["kspace_factor"]) if params.get("kspace_factor") else None
            except ValueError as e:
                raise InputError(
                    f"sigma_mm, kspace_factor: expected numbers, got {params.get('sigma_mm')!r}, "
                    f"{params.get('kspace_factor')!r}"
                ) from e
            result = enhance(
                params["image"],
                out,
                networks,
                target_spacing=target,
                modality=params.get("modality") or None,
                degradation=str(params.get("degradation") or "noise"),
                kernel=str(params.get("kernel") or "gaussian"),
                sigma_mm=sigma_mm,
                kspace_factor=kspace_factor,
                num_inference_steps=int(params["num_inference_steps"]),
                seed=int(params["seed"]),
                sliding_window=sliding_window,
                device=device,
                **options,
            )
        except Exception as e:  # the image, the settings or the weights: a 422 whose detail is the one-line reason
            Path(out).unlink(missing_ok=True)
            if user_error(e) is None:
                raise
            from fastapi import HTTPException  # MONAI Label's web framework

            raise HTTPException(status_code=422, detail=f"error: {user_error(e)}") from e
        return out, {k: result[k] for k in ("seconds", "modality", "shape", "spacing")}
