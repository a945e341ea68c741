"""Training jobs under a time limit: the time budget, resuming (with the best model so far), early stopping, and
yes/no options from the command line."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator
from monai.handlers import ValidationHandler
from scripts.checkpoints import ResumeHandler, TimeBudget, TrainingCheckpointSaver, ValidationRecord, WarmStart
from scripts.options import flag
from tests.conftest import ROOT


def fake_clock(seconds_per_call: float):
    """A clock that advances ``seconds_per_call`` each time it is read (read at the start and once per epoch)."""
    ticks = itertools.count()
    return staticmethod(lambda: next(ticks) * seconds_per_call)


def epochs_run(max_seconds: float | None, max_epochs: int = 10) -> int:
    engine = Engine(lambda e, b: None)
    TimeBudget(max_seconds).attach(engine)
    engine.run(range(2), max_epochs=max_epochs)
    return engine.state.epoch


def test_stops_after_the_last_epoch_that_fits(monkeypatch):
    monkeypatch.setattr(TimeBudget, "clock", fake_clock(10.0))  # every epoch takes 10 s
    assert epochs_run(35.0) == 3  # after epoch 3: 30 s used + 10 s for the next = 40 > 35
    assert epochs_run(40.0) == 4
    assert epochs_run(1e6) == 10  # max_epochs comes first
    assert epochs_run(None) == 10 and epochs_run(0) == 10  # no limit
    assert epochs_run(5.0) == 1  # at least one epoch, whatever the budget


def _rank(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        TimeBudget.clock = fake_clock(10.0 if rank == 0 else 1.0)  # rank 0 is slower: only it runs out of time
        results[rank] = epochs_run(35.0)
    finally:
        dist.destroy_process_group()


def test_ranks_stop_together(tmp_path):
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    assert dict(results) == {0: 3, 1: 3}  # rank 1 alone would run all 10


@pytest.mark.parametrize("max_seconds", [-1.0, float("nan"), "ten"])
def test_a_bad_budget_is_refused(max_seconds):
    with pytest.raises(ValueError):
        TimeBudget(max_seconds)


def test_yes_no_options_read_as_the_command_line_means_them():
    # `python -m monai.bundle run ... --amp false` passes the string 'false', which Python would take as true
    assert [flag(v) for v in (True, False, 1, 0, "true", "False", " YES ", "no", "1", "0")] == [True, False] * 5
    for bad in ("maybe", "", 2, None, 0.5):
        with pytest.raises(ValueError, match="must be true or false"):
            flag(bad)
    assert ResumeHandler("false", "", "x", {}).enabled is False
    assert ResumeHandler("auto", "", "x", {}).enabled == "auto"
    with pytest.raises(ValueError, match="resume"):
        ResumeHandler("later", "", "x", {})


class Scripted(Metric):
    """A validation metric that returns the next of the given values at each validation."""

    def __init__(self, values):
        self.values = iter(values)
        super().__init__()

    def reset(self):
        pass

    def update(self, output):
        pass

    def compute(self):
        return next(self.values)


LOWER_IS_BETTER = {"autoencoder": False, "diffusion": True, "controlnet": True, "regression": True}


def naming(raw: dict) -> dict:
    """The config keys that the best-model file name is made of."""
    return {k: raw[k] for k in ("name", "weights_file") if k in raw}


def validated_training(stage: str, ckpt, values, epochs: range, state: dict | None = None, patience: int = 0):
    """Train for ``epochs`` (a plain engine whose "network" weight is the epoch number), validating every epoch
    with a MONAI evaluator whose key metric yields ``values`` and the stage config's best-model saver; as after a
    restart when ``state`` (a ValidationRecord state) is given. Returns the trainer and the record."""
    raw = json.loads((ROOT / "configs" / f"train_{stage}.json").read_text())
    parser = ConfigParser(
        {
            **naming(raw),
            "saver": {
                **raw["validate"]["best_saver"],
                "save_dir": str(ckpt),
                "save_dict": {stage: "$torch.nn.Linear(1, 1)"},
            },
        }
    )
    saver = parser.get_parsed_content("saver", lazy=False)
    net = saver.save_dict[stage]
    evaluator = SupervisedEvaluator(
        "cpu",
        [{"image": torch.zeros(1, 1), "label": torch.zeros(1, 1)}],
        torch.nn.Identity(),
        key_val_metric={"val": Scripted(values)},
        val_handlers=[saver],
        metric_cmp_fn=(lambda c, b: c < b) if LOWER_IS_BETTER[stage] else (lambda c, b: c > b),
    )
    trainer = Engine(lambda e, b: net.weight.data.fill_(e.state.epoch))
    record = ValidationRecord(evaluator, saver, patience)
    ValidationHandler(1, evaluator).attach(trainer)
    record.attach(trainer)
    if state is not None:
        record.load_state_dict(state)
        trainer.load_state_dict({"epoch": epochs.start - 1, "max_epochs": epochs.stop - 1, "epoch_length": 1})
    trainer.run([0], max_epochs=epochs.stop - 1)
    return trainer, record


@pytest.mark.parametrize("stage", LOWER_IS_BETTER)
def test_the_best_model_survives_a_resume_and_patience_stops_training(stage, tmp_path):
    raw = json.loads((ROOT / "configs" / f"train_{stage}.json").read_text())
    declared = raw["validate"]["evaluator"].get("metric_cmp_fn")
    if declared:  # the evaluator's own notion of "better" agrees with the saver's
        assert ConfigParser({"f": declared}).get_parsed_content("f")(0.1, 0.2) == LOWER_IS_BETTER[stage]
    filename = {**naming(raw), "f": raw["validate"]["best_saver"]["key_metric_filename"]}
    best_file = tmp_path / ConfigParser(filename).get_parsed_content("f")
    assert best_file.name == ("model.pt" if stage == "regression" else f"{stage}.pt")  # the zoo's name for network_def

    def best_epoch() -> int:
        return int(torch.load(best_file, weights_only=True)["weight"].item())

    lower = LOWER_IS_BETTER[stage]
    first, later = ([0.5, 0.2, 0.9], [0.3, 0.4, 0.35]) if lower else ([0.5, 0.9, 0.2], [0.8, 0.7, 0.75])
    _, record = validated_training(stage, tmp_path, first, range(1, 4))
    assert best_epoch() == 2  # the best validation in the metric's direction (MONAI's saver alone keeps the largest)
    state = json.loads(json.dumps(record.state_dict()))  # plain values only, as in a weights_only checkpoint
    trainer, _ = validated_training(stage, tmp_path, later, range(4, 7), state)  # worse than the best, better than
    assert trainer.state.epoch == 6 and best_epoch() == 2  # the last: a fresh saver would have taken epoch 4
    trainer, _ = validated_training(stage, tmp_path, later, range(4, 7), state, patience=2)
    assert trainer.state.epoch == 4  # one stale validation before the restart, a second after it: stop
    with pytest.raises(ValueError, match="patience"):
        ValidationRecord(None, None, -1)


def test_warm_start_loads_weights_and_a_resumed_checkpoint_wins(tmp_path):
    """--init_weights: the networks (inside a wrapper too) start from the file; --resume, listed after it, wins."""
    torch.manual_seed(0)
    start, resumed, net = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    wrapper = torch.optim.swa_utils.AveragedModel(torch.nn.Linear(2, 2))  # as the prior's EMA copy

    def first_weights(handlers) -> list[torch.Tensor]:
        seen = []
        engine = Engine(lambda e, b: seen or seen.extend([net.weight.clone(), wrapper.module.weight.clone()]))
        for h in handlers:
            h.attach(engine)
        engine.run([0], max_epochs=2)
        return seen

    warm = WarmStart(str(tmp_path / "start.pt"), [net, wrapper])
    assert all(torch.equal(w, start.weight) for w in first_weights([warm]))
    torch.save(
        {"net": resumed.state_dict(), "trainer": {"epoch": 1, "max_epochs": 2, "epoch_length": 1}},
        tmp_path / "x_checkpoint_epoch=1.pt",
    )
    resume = ResumeHandler(True, str(tmp_path), "x", {"net": net})
    assert torch.equal(first_weights([warm, resume])[0], resumed.weight)  # a checkpoint without amp_scalers too
    assert torch.equal(first_weights([WarmStart(None, [net])])[0], net.weight)  # off: nothing loaded
    with pytest.raises(FileNotFoundError, match="init_weights"):
        WarmStart(str(tmp_path / "missing.pt"), [net])


def test_a_resumed_run_keeps_its_amp_loss_scale(tmp_path):
    """The trainers' gradient scalers go into the training checkpoint: a resumed AMP run goes on at the loss
    scale it had reached, instead of restarting at 65536 and skipping steps on overflow. CPU scalers stand in
    for CUDA ones; a scaler that is off saves nothing."""
    net = torch.nn.Linear(1, 1)

    def trainer(**scalers) -> Engine:
        engine = Engine(lambda e, b: None)
        for name, scaler in scalers.items():
            setattr(engine, name, scaler)
        return engine

    first = trainer(
        scaler=torch.amp.GradScaler("cpu", init_scale=1024.0), d_scaler=torch.amp.GradScaler("cpu", init_scale=8.0)
    )
    TrainingCheckpointSaver(str(tmp_path), {"net": net}, "x").attach(first)
    first.run([0], max_epochs=1)
    second = trainer(scaler=torch.amp.GradScaler("cpu"), d_scaler=torch.amp.GradScaler("cpu"))
    ResumeHandler(True, str(tmp_path), "x", {"net": net}).attach(second)
    second.run([0], max_epochs=2)
    assert (second.scaler.get_scale(), second.d_scaler.get_scale()) == (1024.0, 8.0)

    off = trainer(scaler=torch.amp.GradScaler("cpu", enabled=False))  # full precision: the scaler saves nothing
    TrainingCheckpointSaver(str(tmp_path / "off"), {"net": net}, "x").attach(off)
    off.run([0], max_epochs=1)
    amp = trainer(scaler=torch.amp.GradScaler("cpu", init_scale=64.0))
    ResumeHandler(True, str(tmp_path / "off"), "x", {"net": net}).attach(amp)
    amp.run([0], max_epochs=2)
    assert amp.scaler.get_scale() == 64.0


def test_a_distributed_run_ends_with_the_group_destroyed_and_a_clean_exit(tmp_path):
    """``scripts.distributed.finish`` (the multi-process configs' finalize): the group is gone afterwards, a DDP
    wrapper that still holds it (here in a reference cycle, as in a workflow) is freed at exit, and the process
    exits 0; without a group it does nothing."""
    import subprocess
    import sys

    from scripts.distributed import finish

    finish()  # no process group: nothing to do
    code = f"""
import torch, torch.distributed as dist
from scripts.distributed import finish
dist.init_process_group("gloo", init_method="file://{tmp_path / 'init'}", rank=0, world_size=1)
held = [torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))]
held.append(held)
held[0](torch.ones(1, 2)).sum().backward()
finish()
print("initialized after finish:", dist.is_initialized())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "initialized after finish: False" in res.stdout
