"""The server that a sweep's local workers are forked from (hydra/launcher=local): a process that
has imported what a job needs and has computed nothing.

Started first thing by the command line (`main`, what `train.py` and `normlab-train` run, before
Hydra is imported), so that its imports (torch, Lightning: most of a short sweep's start) run
while the command line composes and checks the sweep. Only the standard library is imported
here, for that reason.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

# What a job imports, loaded once in the server so that every forked worker starts warm.
JOB_IMPORTS = ["normlab.train", "lightning.pytorch", "normlab.models.module",
               "normlab.callbacks.ics", "normlab.data.datamodule", "sklearn.datasets"]


def forkserver() -> Any:
    """The forkserver context, its server started with JOB_IMPORTS loaded."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(JOB_IMPORTS)
    passive = "OMP_WAIT_POLICY" not in os.environ
    if passive:  # read by OpenMP when the server loads it: its forked workers inherit it
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from multiprocessing import forkserver as server

        server.ensure_running()
    finally:
        if passive:
            del os.environ["OMP_WAIT_POLICY"]
    return context


def main() -> None:
    """The command line: the server first when the arguments are a sweep, then
    `normlab.train.main` (Hydra, the checks, the runs)."""
    import sys

    start_early(sys.argv[1:])
    from normlab.train import main as command_line

    command_line()


def start_early(argv: Sequence[str]) -> None:
    """Start the server now when `argv` is a sweep for the local launcher (the default one)."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    other_launcher = any(a.startswith("hydra/launcher=") and a != "hydra/launcher=local"
                         for a in argv)
    if multirun and not other_launcher:
        forkserver()


def stop() -> None:
    """End the server now, not once it notices that this process is gone: it has nothing to save,
    and its interpreter's teardown would take a core from whatever runs next."""
    import signal
    from multiprocessing import forkserver as server

    pid = getattr(getattr(server, "_forkserver", None), "_forkserver_pid", None)
    if pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
