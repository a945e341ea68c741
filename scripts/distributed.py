"""The end of a ``torchrun`` process: the ranks meet, the process group goes, and its threads stop while Python is
still whole.

``destroy_process_group`` drops the group from ``torch.distributed``'s registry, but the DDP wrappers and their
reducers still hold it; they are freed with the workflow after ``monai.bundle run`` returns, by Python's last
garbage collection while the interpreter is torn down. A gloo worker thread stopped then is the likely cause of
a rank that aborted after its work was done ("terminate called without an active exception", SIGABRT, once in
40 multi-process test runs). Collecting at exit, before the teardown, stops those threads while the interpreter
can still serve them.
"""

from __future__ import annotations

import atexit
import gc

import torch.distributed as dist

__all__ = ["finish"]


def finish() -> None:
    """Wait for every rank, destroy the process group, and collect what still holds it at exit (a no-op when no
    process group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    atexit.register(gc.collect)
