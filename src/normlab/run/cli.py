"""The command line around Hydra: checks first, then one line (not a traceback) for every way a
run can end badly, and the exit code that says how it ended.

Exit codes: 0 ok (or nothing to do), 1 a run failed, 2 bad config, 130/143 stopped by
SIGINT/SIGTERM (128 + the signal's number).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from normlab.config.errors import ConfigError
from normlab.run import signals


def run_command_line(hydra_main: Callable[[], Any], argv: list[str]) -> NoReturn:
    """`preflight` the arguments, run `hydra_main`, and exit with the code of how it ended."""
    try:
        _run(hydra_main, argv)
    except SystemExit as end:
        _exit_now(end.code)


def _exit_now(code: int | str | None) -> NoReturn:
    """Exit once everything is written: the exit functions run (log files flushed and closed,
    multiprocessing's resources released, ...) but not the interpreter's teardown, which with
    torch, matplotlib and pandas loaded takes a second and writes nothing. The normal exit when
    something else still runs (joblib's workers, a DataLoader's, a thread), or under a profiler,
    a coverage tool or a debugger (they write at exit)."""
    import atexit
    import multiprocessing
    import threading

    from hydra_plugins.normlab_local.local_launcher import close_workers
    from normlab.run import forkserver

    close_workers()
    forkserver.stop()
    others = multiprocessing.active_children() or [
        t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    atexit._run_exitfuncs()  # noqa: SLF001 -- what the normal exit runs first (logging.shutdown...)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def _run(hydra_main: Callable[[], Any], argv: list[str]) -> NoReturn:
    os.environ[signals.LAUNCHER_PID] = str(os.getpid())
    signals.install()
    try:
        _checked_then_run(hydra_main, argv)
    except signals.RunInterrupted as stop:
        _stopped(stop)
    except KeyboardInterrupt:  # before our handler was installed
        _stopped(signals.RunInterrupted(int(signals.signal.SIGINT)))
    except OSError as error:  # e.g. Hydra writing .hydra/ into a full or read-only dir
        _fail(f"{error.strerror or error}: {error.filename or ''}".rstrip(": "), 1)
    signum = signals.received()
    if signum is not None:  # a sweep whose jobs ran in worker processes: they saved and stopped
        _stopped(signals.RunInterrupted(signum), summary_written=True)
    sys.exit(0)


def _checked_then_run(hydra_main: Callable[[], Any], argv: list[str]) -> None:
    from normlab.config.preflight import check_command_line
    from normlab.run.resume import ResumeFinished

    try:
        check_command_line(argv)
    except ResumeFinished as finished:
        print(f"normlab: {finished}", file=sys.stderr)
        sys.exit(0)
    except ConfigError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(str(error), 2)
    try:
        hydra_main()
    except SystemExit:
        if signals.received() is None:
            raise


def _fail(message: str, code: int) -> NoReturn:
    print(f"normlab: error: {message}", file=sys.stderr)
    sys.exit(code)


def _stopped(stop: signals.RunInterrupted, summary_written: bool = False) -> NoReturn:
    sweep_dir = _sweep_dir()
    if sweep_dir is not None and not summary_written:
        from normlab.results.sweep import write_summary

        write_summary(sweep_dir)
    if sweep_dir is None:
        message = stop.message
    elif summary_written:  # the jobs ran in worker processes; each one recorded its checkpoint
        message = (
            f"sweep interrupted by {stop.name}; each interrupted job's metrics.json names its "
            f"checkpoint; summary: {sweep_dir / 'summary.md'}"
        )
    else:
        message = f"{stop.message}; sweep stopped, summary: {sweep_dir / 'summary.md'}"
    print(f"normlab: {message}", file=sys.stderr)
    sys.exit(stop.exit_code)


def _sweep_dir() -> Path | None:
    sweep = signals.sweep_info()
    return sweep[0] if sweep is not None and sweep[0].is_dir() else None
