"""SIGTERM and SIGINT (a scheduler's preemption, `timeout`, Ctrl-C) stop a run without losing it.

While a model trains, the first signal only sets a flag; `normlab.run.checkpoints.StopOnSignal`
sees it after the
current Lightning step, saves `checkpoints/last.ckpt` (mid-epoch if need be; atomically, see
`normlab.run.checkpoints`) and stops the run. Outside training (start-up, data loading, between
jobs) the signal stops at once. A second signal always stops at once.

The run is then recorded `status: interrupted` with the signal's name and the checkpoint
(`interruption_recorded`), and `RunInterrupted` travels up to the command line, which writes the
sweep's summary.md for the jobs that ran and exits 128 + the signal's number (130 for SIGINT,
143 for SIGTERM); see `normlab.run.cli`.

In a sweep, a signal stops the whole sweep: the running job saves and stops, jobs not started
yet are skipped. Jobs in other processes (hydra/launcher=joblib) learn of it from a marker file
`<sweep dir>/.interrupted` that the signalled process writes; they check it after every step.

Lightning registers its own SIGTERM handler during `fit` and calls ours after it; it then raises
its `SIGTERMException` (a `SystemExit` with code 0) at its own check points: ours runs first at a
step's end, and `as_interruption` turns Lightning's exception into ours elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

log = logging.getLogger("normlab")

HANDLED = (signal.SIGINT, signal.SIGTERM)
MARKER = ".interrupted"
LAUNCHER_PID = "NORMLAB_LAUNCHER_PID"  # the command line's process; set by normlab.run.cli


class _State:
    signum: int | None = None  # the first signal received by this process
    training: int = 0  # > 0 while StopOnSignal watches the steps
    checkpoint: Path | None = None  # saved by StopOnSignal
    step: int | None = None
    sweep: tuple[Path, str] | None = None  # (sweep dir, launcher _target_) in the launcher process
    in_process: bool | None = None  # said by a launcher that decides per sweep (normlab's local)


class RunInterrupted(BaseException):
    """A run or sweep stopped by a signal. BaseException, like KeyboardInterrupt: no `except
    Exception` on the way up mistakes it for the run's own failure."""

    def __init__(self, signum: int, checkpoint: Path | None = None, step: int | None = None):
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step
        super().__init__(self.message)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def message(self) -> str:
        if self.checkpoint is None:
            return f"interrupted by {self.name} before training started: nothing was trained"
        return (
            f"interrupted by {self.name} at optimizer step {self.step}; saved {self.checkpoint} "
            f"(resume with ckpt_path={self.checkpoint})"
        )

    def record(self) -> dict[str, Any]:
        """The keys it sets in metrics.json."""
        return {
            "status": "interrupted",
            "signal": self.name,
            "error": self.message,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
        }


def in_slurm_job() -> bool:
    """True inside a job that submitit runs on SLURM (hydra/launcher=submitit_slurm)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def preempt_signal() -> int | None:
    """In a SLURM job: the warning signal sbatch sends before the time limit (submitit's
    `--signal`, USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise); None elsewhere."""
    if not in_slurm_job():
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return int(getattr(signal.Signals, "SIG" + name.removeprefix("SIG"), signal.SIGUSR2))


def keeps_interruption() -> bool:
    """Does RunInterrupted travel on from the task function? In the command line's process (it
    writes the summary, exits 130/143) and in a SLURM job: submitit must get no result from an
    attempt that SLURM requeues, so the sweep waits for the attempt that ends the job."""
    return is_launcher_process() or in_slurm_job()


def requeue_after_warning(signum: int) -> None:
    """After the checkpoint for the time-limit warning is saved: requeue this SLURM job (it
    resumes from that checkpoint in its own dir). SLURM requeues a preempted job itself."""
    if signum == preempt_signal():
        import subprocess

        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        log.warning("normlab: requeue of SLURM job %s: %s", job,
                    "ok" if done.returncode == 0 else done.stderr.strip())


class WorkerInterrupted(Exception):
    """A spawned DDP worker's RunInterrupted, as an Exception: torch's spawn hands an Exception's
    text to the main process (which turns it back into RunInterrupted, `as_interruption`); a
    BaseException would end the worker with a traceback instead."""


def stop_run(signum: int, ddp: bool) -> BaseException:
    """What StopOnSignal raises after saving: RunInterrupted, or in a spawned DDP worker its
    `WorkerInterrupted` twin."""
    import multiprocessing

    stop = interruption(signum)
    spawned = ddp and multiprocessing.parent_process() is not None
    return WorkerInterrupted(stop.message) if spawned else stop


def install() -> None:
    """Handle SIGINT and SIGTERM in this process (idempotent; main thread only), and in a SLURM
    job the time-limit warning signal (instead of submitit's handler, which would requeue the
    job without saving a checkpoint)."""
    if threading.current_thread() is not threading.main_thread():
        return
    warning = preempt_signal()
    for signum in (*HANDLED, *([warning] if warning else [])):
        if signal.getsignal(signum) is not _handler:
            signal.signal(signum, _handler)


def _handler(signum: int, frame: Any) -> None:
    first = _State.signum is None
    if first:
        _State.signum = signum
        _mark_sweep(signum)
    workers = _spawned_workers()
    if first and (_State.training or _jobs_run_elsewhere() or workers):
        for worker in workers:  # spawned DDP (trainer=ddp_cpu): the workers train, they stop
            with contextlib.suppress(OSError):
                os.kill(worker.pid, signum)
        log.warning(
            "normlab: %s received: stopping after the current step (again to stop at once)",
            signal.Signals(signum).name,
        )
        return
    for worker in workers:  # a second signal: no worker may outlive this process
        with contextlib.suppress(OSError):
            os.kill(worker.pid, signal.SIGKILL)
    raise RunInterrupted(signum)


def _spawned_workers() -> list[Any]:
    """The spawned DDP workers of this process (Lightning's ddp_spawn), if any."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:  # a worker itself
        return []
    sweep_workers = ("loky", "forkserver")  # joblib's and the local launcher's: they watch MARKER
    return [p for p in multiprocessing.active_children()
            if p.pid and not any(name in p.name.lower() for name in sweep_workers)]


def watch_steps(active: bool) -> None:
    """While active (a model is fitting), the first signal only asks to stop after the step."""
    _State.training = _State.training + 1 if active else max(0, _State.training - 1)


def checkpoint_saved(path: Path, step: int) -> None:
    _State.checkpoint, _State.step = path, step


def has_saved() -> bool:
    return _State.checkpoint is not None


def interruption(signum: int) -> RunInterrupted:
    """The RunInterrupted for `signum`, with the checkpoint saved for it, if any."""
    return RunInterrupted(signum, _State.checkpoint, _State.step)


def received() -> int | None:
    """The signal this process received, if any."""
    return _State.signum


def stop_requested() -> int | None:
    """The signal that stops this run: received here, or by another process of the sweep."""
    if _State.signum is not None:
        return _State.signum
    marker = _sweep_marker()
    if marker is not None and marker.is_file():
        name = marker.read_text().strip() or "SIGTERM"
        return int(getattr(signal.Signals, name, signal.SIGTERM))
    return None


def is_launcher_process() -> bool:
    """True in the command line's own process (and when there is no command line: tests)."""
    return os.environ.get(LAUNCHER_PID, str(os.getpid())) == str(os.getpid())


class SweepSignals(HydraCallback):
    """Hydra callback: tells this module, in the process that launches a sweep, where the sweep
    lives and how its jobs run (Hydra sets its job config only while a job runs in-process)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _State.sweep = (Path(config.hydra.sweep.dir), str(config.hydra.launcher._target_))
        (_State.sweep[0] / MARKER).unlink(missing_ok=True)  # from an earlier, stopped sweep


def sweep_info() -> tuple[Path, str] | None:
    """(sweep dir, launcher `_target_`) when this process runs or launches a sweep's jobs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        config = HydraConfig.get()
        return Path(config.sweep.dir), str(config.launcher.get("_target_", ""))
    return _State.sweep


def _sweep_marker() -> Path | None:
    sweep = sweep_info()
    if sweep is None or in_slurm_job() or "submitit" in sweep[1] or "slurm" in sweep[1].lower():
        return None  # a SLURM job's signal is its own (preemption): the others go on
    return sweep[0] / MARKER


def _mark_sweep(signum: int) -> None:
    with contextlib.suppress(Exception):
        marker = _sweep_marker()
        if marker is not None and marker.parent.is_dir():
            marker.write_text(signal.Signals(signum).name + "\n")


def _jobs_run_elsewhere() -> bool:
    """In the process that launched a sweep whose jobs run in worker processes: wait for them
    to save and stop, then write the summary."""
    sweep = sweep_info()
    if sweep is None or not is_launcher_process():
        return False
    if _State.in_process is not None:
        return not _State.in_process
    return "BasicLauncher" not in sweep[1]


def jobs_run_in_this_process(in_process: bool) -> None:
    """Said by a launcher before it runs a sweep's jobs: here, or in worker processes."""
    _State.in_process = in_process


def as_interruption(error: BaseException) -> RunInterrupted | None:
    """`error` as a RunInterrupted when a signal caused it, else None."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(error, RunInterrupted):
        return error
    signum = _State.signum
    if signum is not None and type(error).__name__ in ("ProcessRaisedException",
                                                       "ProcessExitedException"):
        return _from_worker(signum, str(error))
    if isinstance(error, SIGTERMException):
        signum = signum or signal.SIGTERM
    elif isinstance(error, KeyboardInterrupt):
        signum = signum or signal.SIGINT
    else:
        return None
    return interruption(signum)


def _from_worker(signum: int, text: str) -> RunInterrupted:
    """The interruption a spawned DDP worker reported (its RunInterrupted's text names the
    checkpoint it saved and the step), for the process that spawned it."""
    import re

    saved = re.search(r"at optimizer step (\d+); saved (\S+) \(resume", text)
    if saved is None:
        return RunInterrupted(signum)
    return RunInterrupted(signum, Path(saved.group(2)), int(saved.group(1)))


@contextlib.contextmanager
def interruption_recorded(result: dict[str, Any]) -> Iterator[None]:
    """Around one run: a signal, now or during it, sets `result`'s status to interrupted and
    raises RunInterrupted; a sweep already told to stop does not start this run."""
    install()
    _State.checkpoint = _State.step = None
    try:
        signum = stop_requested()
        if signum is not None:
            raise RunInterrupted(signum)
        yield
    except BaseException as error:
        stop = as_interruption(error)
        if stop is None:
            raise
        result.update(stop.record())
        if stop is error:
            raise
        raise stop from error
