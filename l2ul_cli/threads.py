"""How many CPU threads torch computes with: ``--threads N``, ``OMP_NUM_THREADS``, or by default
the cores the machine's load leaves free.

torch's own default, one thread per core, collapses when another process holds a core: its
threads wait on each other at every operation. On a busy 2-core machine the README's first
command took 215.6 s that way against 17.2 s on one thread (issue 26; benchmarks/RESULTS.md,
"CPU threads").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class Threads:
    n: int
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"n": self.n, "reason": self.reason}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested: int | None = None, *, cores: int | None = None, load: float | None = None,
                   env: str | None = None) -> Threads:
    """The thread count and why. ``cores``, ``load`` (the 1-minute load average) and ``env``
    (``OMP_NUM_THREADS``) default to this machine's; tests pass them."""
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--threads must be at least 1 (got {requested})")
        return Threads(requested, "--threads")
    env = os.environ.get("OMP_NUM_THREADS") if env is None else env
    if env and env.strip().isdigit() and int(env) > 0:
        return Threads(int(env), "OMP_NUM_THREADS")
    cores = cores or _cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return Threads(cores, f"{cores} cores (no load average on this system)")
    busy = min(cores - 1, math.floor(load + 0.5))
    return Threads(cores - busy, f"{cores} cores, {busy} busy (1-minute load {load:.2f})")


def use_threads(threads: Threads | None) -> dict[str, object]:
    """Set ``threads`` for this process (None: leave the caller's count); the report's entry."""
    import torch  # here, not at the top: `l2ul --help` and completion need no torch

    if threads is None:
        return {"n": torch.get_num_threads(), "reason": "as the caller set it"}
    torch.set_num_threads(threads.n)
    return threads.to_dict()
