"""Training jobs under a time limit: the time budget, resuming, and yes/no options from the command line."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine

from scripts.checkpoints import ResumeHandler, TimeBudget
from scripts.options import flag


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
