"""Training that spans several runs: periodic checkpoints that include the engine itself, resuming from the
latest of them with the best validation score so far, early stopping, a time budget per run, and a warm start
from an earlier run's weights alone.

A bundle config cannot put the trainer into the ``save_dict`` of one of the trainer's own handlers (a circular
reference), so these handlers add the engine they are attached to, and its AMP gradient scalers.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver, MLFlowHandler
from scripts.errors import InputError, MissingFileError
from scripts.options import flag

logger = logging.getLogger(__name__)


def latest_checkpoint(ckpt_dir: str | Path, prefix: str) -> Path | None:
    """The ``<prefix>_checkpoint_epoch=N.pt`` with the largest N in ``ckpt_dir``, or None."""
    found = []
    for p in Path(ckpt_dir).glob(f"{prefix}_checkpoint_epoch=*.pt"):
        m = re.search(r"epoch=(\d+)\.pt$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


class AmpScalers:
    """The AMP gradient scalers of a trainer (``scaler``, and ``d_scaler`` for the autoencoder's discriminator) as
    one checkpoint entry. Without them a resumed AMP run starts again from the initial loss scale (65536) and
    skips its first steps on overflow until the scale has come back down. A scaler that is off (no AMP, or a CPU
    run) saves nothing and loads nothing, so checkpoints move between AMP and full-precision runs.
    """

    names = ("scaler", "d_scaler")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _scalers(self) -> dict[str, torch.amp.GradScaler]:
        found = {name: getattr(self.engine, name, None) for name in self.names}
        return {name: s for name, s in found.items() if isinstance(s, torch.amp.GradScaler)}

    def state_dict(self) -> dict:
        return {name: s.state_dict() for name, s in self._scalers().items()}

    def load_state_dict(self, state: dict) -> None:
        for name, scaler in self._scalers().items():
            if state.get(name):  # an empty state comes from a scaler that was off
                scaler.load_state_dict(state[name])


class ResumeHandler:
    """When ``enabled``, restore ``load_dict`` (networks, optimizers, schedulers, engine state) from the latest
    checkpoint before the run starts, so the iteration count and learning rate continue where they stopped.

    ``True`` without a checkpoint is an error rather than a silent fresh start; ``"auto"`` resumes when there is
    one and starts afresh when there is none, for jobs that are simply run again until training completes.
    """

    def __init__(
        self,
        enabled: bool | str,
        ckpt_dir: str,
        prefix: str,
        load_dict: dict,
        map_location: str | torch.device | None = None,
    ) -> None:
        if enabled != "auto":
            enabled = flag(enabled, "resume (true, false or auto)")
        self.enabled, self.ckpt_dir, self.prefix = enabled, ckpt_dir, prefix
        self.load_dict, self.map_location = load_dict, map_location

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.ckpt_dir, self.prefix)
        if path is None and self.enabled == "auto":
            logger.info("%s: no %s checkpoint, starting afresh", self.ckpt_dir, self.prefix)
            return
        if path is None:
            raise MissingFileError(
                f"{self.ckpt_dir}: resume requested but no {self.prefix}_checkpoint_epoch=*.pt found"
            )
        logger.info("resuming from %s", path)
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # the keys; tensors stay on disk
        scalers = {"amp_scalers": AmpScalers(engine)} if "amp_scalers" in saved else {}  # absent before 0.11.0
        CheckpointLoader(
            load_path=str(path),
            load_dict={**self.load_dict, "trainer": engine, **scalers},
            map_location=self.map_location,
            name="resume",
        ).attach(engine)


class WarmStart:
    """``--init_weights FILE``: when training starts, load an earlier run's ``<stage>.pt`` into ``networks`` (the
    module inside a DDP or EMA wrapper), with a fresh optimizer, schedule and iteration count. For going on in a
    new session on a machine that kept no checkpoint (a full checkpoint's optimizer states are too large to carry
    back), or fine-tuning on new data. List it before ``ResumeHandler``: a checkpoint resumed after it wins.
    """

    def __init__(
        self,
        path: str | None,
        networks: Sequence[torch.nn.Module],
        loader: Callable[..., torch.nn.Module] | None = None,
        map_location: str | torch.device | None = None,
    ) -> None:
        if path and not Path(path).is_file():
            raise MissingFileError(f"{path}: no weights to start from (--init_weights)")
        self.path, self.networks = path, list(networks)
        self.loader, self.map_location = loader or load_weights, map_location or "cpu"

    def attach(self, engine: Engine) -> None:
        if self.path:
            engine.add_event_handler(Events.STARTED, self._load)

    def _load(self, engine: Engine) -> None:
        for network in self.networks:
            self.loader(getattr(network, "module", network), self.path, self.map_location)
        logger.info("started from the weights of %s (fresh optimizer and schedule)", self.path)


class TrainingCheckpointSaver:
    """Save ``save_dict`` plus the engine every ``save_interval`` epochs as ``<prefix>_checkpoint_epoch=N.pt``,
    keeping the last ``n_saved``, and at the end of training as ``<prefix>_checkpoint_final.pt``.

    When experiment tracking is on (``--tracking mlflow`` appends an ``MLFlowHandler`` to the trainer), the final
    checkpoint and the existing files among ``artifacts`` (the stage's weights) are added to that handler's
    artifacts, which it logs when training completes.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        prefix: str,
        save_interval: int = 1,
        n_saved: int = 1,
        artifacts: Sequence[str] = (),
    ) -> None:
        self.save_dir, self.save_dict, self.prefix = save_dir, save_dict, prefix
        self.save_interval, self.n_saved, self.artifacts = save_interval, n_saved, list(artifacts)
        self.final = Path(save_dir) / f"{prefix}_checkpoint_final.pt"

    def attach(self, engine: Engine) -> None:
        CheckpointSaver(
            save_dir=self.save_dir,
            save_dict={**self.save_dict, "trainer": engine, "amp_scalers": AmpScalers(engine)},
            file_prefix=self.prefix,
            save_interval=self.save_interval,
            n_saved=self.n_saved,
            epoch_level=True,
            save_final=True,
            final_filename=self.final.name,
        ).attach(engine)
        engine.add_event_handler(Events.COMPLETED, self.track_artifacts)

    def track_artifacts(self, engine: Engine) -> None:
        files = [str(f) for f in (self.final, *map(Path, self.artifacts)) if f.is_file()]
        for handler, *_ in engine._event_handlers[Events.COMPLETED]:  # Ignite has no public listing
            tracker = getattr(handler, "__self__", None)
            if isinstance(tracker, MLFlowHandler):
                tracker.artifacts = (*tracker.artifacts, *files)


class ValidationRecord:
    """The validation's best score so far, kept in the training checkpoint, and early stopping on it.

    MONAI's evaluator (``best_metric``) and key-metric ``CheckpointSaver`` (which writes ``<stage>.pt``) keep the
    best score in memory only, so after ``--resume`` the first validation would replace the best model even with
    a worse one. Put in ``checkpoint_dict``, this record carries both over. With ``patience`` N it also stops
    training after N validations in a row without a new best (``None`` or 0: never), so a run ends when the
    validation stops improving rather than at a fixed epoch. Every rank sees the same (all-reduced) metrics, so
    under torch.distributed the ranks stop together.
    """

    def __init__(self, evaluator: Engine, saver: CheckpointSaver | None = None, patience: int | None = None) -> None:
        self.patience = int(patience or 0)
        if self.patience < 0:
            raise InputError(f"patience must be a number of validations >= 0, or None; got {patience}")
        self.evaluator, self.saver, self.stale = evaluator, saver, 0

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        self.evaluator.add_event_handler(Events.COMPLETED, self.validated)

    def validated(self, evaluator: Engine) -> None:
        self.stale = 0 if evaluator.state.best_metric_epoch == evaluator.state.epoch else self.stale + 1
        if self.patience and self.stale >= self.patience:
            state = evaluator.state
            logger.info(
                "no better %s in %d validations (best %.6g at epoch %d): stopping",
                state.key_metric_name,
                self.stale,
                state.best_metric,
                state.best_metric_epoch,
            )
            self.trainer.terminate()

    def state_dict(self) -> dict:
        saved = self.saver._key_metric_checkpoint.state_dict() if self.saver is not None else {}
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
            "stale": self.stale,
            "saved": [[float(p), str(f)] for p, f in saved.get("_saved", [])],
        }

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        self.stale = state["stale"]
        if self.saver is not None:
            self.saver._key_metric_checkpoint.load_state_dict({"_saved": state["saved"]})


class TimeBudget:
    """Stop training after the last epoch that fits in ``max_seconds``, so that a run under a wall-clock limit (a
    batch job, a lent GPU) ends on an epoch boundary, with its epoch checkpoint and final checkpoint written, and
    ``--resume true`` continues it. ``None`` or 0: no limit.

    The time counts from the trainer's start (not the data caching before it). The next epoch is assumed to take
    as long as the longest so far, counted from one epoch's end to the next so that validation and checkpointing
    are included; an epoch that validates for the first time can still overrun by its validation. Under
    torch.distributed the ranks agree (one rank out of time stops all), so that none waits for the others.
    """

    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(self, max_seconds: float | None) -> None:
        self.max_seconds = float(max_seconds or 0)
        if not self.max_seconds >= 0:
            raise InputError(f"max_seconds must be a number of seconds >= 0, or None for no limit; got {max_seconds}")
        self.start = self.last = self.longest = 0.0

    def attach(self, engine: Engine) -> None:
        if self.max_seconds > 0:
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def started(self, engine: Engine) -> None:
        self.start = self.last = self.clock()
        self.longest = 0.0

    def epoch_completed(self, engine: Engine) -> None:
        now = self.clock()
        self.longest = max(self.longest, now - self.last)
        self.last = now
        out_of_time = float(now - self.start + self.longest > self.max_seconds)
        if idist.get_world_size() > 1:
            out_of_time = idist.all_reduce(out_of_time, op="MAX")
        if out_of_time and engine.state.epoch < engine.state.max_epochs:
            logger.info(
                "time budget of %.0f s: stopping after epoch %d (%.0f s used, an epoch takes up to %.0f s);"
                " continue with --resume true",
                self.max_seconds,
                engine.state.epoch,
                now - self.start,
                self.longest,
            )
            engine.terminate()


def load_weights(
    network: torch.nn.Module, path: str | Path, map_location: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a state dict saved by this bundle (``weights_only=True``), with an error naming a missing file or
    weights made for another network (another width or config)."""
    if not Path(path).is_file():
        raise MissingFileError(f"{path}: no weights (train the stage that makes them, or point ckpt_dir at them)")
    try:
        network.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()
        detail = next((line.strip() for line in reason[1:] if line.strip()), reason[0] if reason else "")
        raise InputError(
            f"{path}: the weights do not fit the configured {type(network).__name__} ({detail}); give the network "
            "config they were trained with (for example configs/small.json in the config list)"
        ) from e
    return network


def load_weights_if_present(
    network: torch.nn.Module, path: str | Path, map_location: str | torch.device = "cpu"
) -> torch.nn.Module | None:
    """``load_weights`` for an optional network (the same-grid restoration stage): ``None``, logged, when ``path``
    does not exist; weights that do not fit are still an error. The network is returned on ``map_location``."""
    if not Path(path).is_file():
        logger.warning("%s: no weights; the network it holds is not used", path)
        return None
    return load_weights(network, path, map_location).to(map_location)
