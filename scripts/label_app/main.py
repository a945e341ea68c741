"""MONAI Label app serving this bundle's enhancement: ``monailabel start_server --app scripts/label_app
--studies IMAGES [--conf ckpt_dir DIR] [--conf device cpu|cuda]`` (see docs/README.md, MONAI Label)."""

from __future__ import annotations

import sys
from pathlib import Path

from monailabel.interfaces.app import MONAILabelApp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the bundle root, for ``scripts``

from scripts.label_app.task import EnhanceTask  # noqa: E402


class EnhanceApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Latent diffusion enhancement",
            description="Denoising and through-plane super-resolution of CT and MR volumes",
        )

    def init_infers(self) -> dict:
        # --conf network_configs "configs/small.json,..." : override files after configs/inference.json, for
        # weights of another width
        extra = [f.strip() for f in str(self.conf.get("network_configs") or "").split(",") if f.strip()]
        task = EnhanceTask(
            ckpt_dir=self.conf.get("ckpt_dir"),
            config_files=("configs/inference.json", *extra),
            device=self.conf.get("device"),
        )
        return {"enhance": task}
