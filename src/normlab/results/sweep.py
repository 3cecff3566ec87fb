"""Hydra callback that closes a sweep: one summary row per job, printed and saved as summary.md.

It reads each job's `metrics.json`, so it works the same for every launcher (in-process,
joblib workers, SLURM). A job dir without `metrics.json` (its process was killed) counts as
failed. A sweep in which any job failed exits non-zero after the summary.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from normlab.results.runs import STATUSES, collect_jobs, last_hidden_layer, markdown
from normlab.run.atomic import atomic_write_bytes

COLUMNS = ("job", "overrides", "status", "val/acc", "test/acc", "train_seconds")
# ICS numbers of the last hidden layer (the BN paper's Fig. 1 layer), from metrics.json "ics".
ICS_COLUMNS = ("p50_travel", "grad_shift_mean")


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per job; a failed job shows its error line."""
    ics_header = [f"last layer {name}" for name in ICS_COLUMNS]
    table = []
    for row in rows:
        ics = row.get("ics") or {}
        last = ics.get(last_hidden_layer(ics) or "", {})
        cells = {c: row.get(c) for c in COLUMNS}
        cells["overrides"] = " ".join(row.get("overrides") or []) or "(defaults)"
        cells["status"] = _status_cell(row)
        cells.update({h: last.get(n) for h, n in zip(ics_header, ICS_COLUMNS, strict=True)})
        table.append(cells)
    return markdown(table, [*COLUMNS, *ics_header])


def _status_cell(row: dict[str, Any]) -> str:
    status = str(row.get("status", ""))
    if status == "interrupted" and row.get("signal"):
        return f"interrupted ({row['signal']})"
    if status in ("failed", "interrupted") and row.get("error"):
        return f"{status}: {row['error']}"
    if status == "diverged" and row.get("diverged_at_step") is not None:
        return f"diverged at step {row['diverged_at_step']}"
    return status


def status_line(rows: list[dict[str, Any]]) -> str:
    """E.g. `4 jobs: 2 ok, 1 diverged, 1 failed`."""
    counts = Counter(row.get("status", "unknown") for row in rows)
    parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s]]
    parts += [f"{n} {s}" for s, n in counts.items() if s not in STATUSES]
    return f"{len(rows)} jobs: {', '.join(parts)}"


# What the comparison figures at the sweep's end import (pandas, matplotlib, TensorBoard's writer).
FIGURE_IMPORTS = ("normlab.results.dashboard", "normlab.results.report", "normlab.results.depth",
                  "matplotlib.backends.backend_agg", "torch.utils.tensorboard")


def _import_in_background(modules: tuple[str, ...]) -> None:
    """Import `modules` in a thread while the jobs run (the launching process mostly waits on
    them), so the figures at the end do not start with a second of imports."""
    import importlib
    import threading

    def load() -> None:
        for module in modules:
            with contextlib.suppress(Exception):  # the figures report their own problems
                importlib.import_module(module)

    threading.Thread(target=load, name="normlab-figure-imports", daemon=True).start()


def _start_figures(sweep_dir: Path) -> Callable[[], None]:
    """Start the comparison figures into TensorBoard, their parts drawn at once on the sweep's
    workers when it has them; return the wait for them. A figure must never fail the sweep."""
    from hydra_plugins.normlab_local.local_launcher import start_in_workers
    from normlab.results import dashboard

    drawn = start_in_workers(dashboard.write_sweep_figures,
                             [(sweep_dir, part) for part in dashboard.FIGURE_PARTS])

    def finish() -> None:
        try:
            drawn()
        except Exception as error:  # e.g. no event files at all (logger=csv)
            print(f"normlab: no comparison figure in TensorBoard: {error}", file=sys.stderr)
        print(dashboard.tensorboard_hint(sweep_dir), flush=True)

    return finish


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write `<sweep dir>/summary.md` for the jobs found there, print it, return its rows.
    Also called by normlab.run.cli when a signal stops a sweep before Hydra's end of the sweep."""
    rows = collect_jobs(sweep_dir)
    for row in rows:
        if "unreadable" in str(row.get("error", "")):
            print(f"normlab: {row['error']}; counted as failed", file=sys.stderr)
    table = summary_table(rows)
    counts = status_line(rows)
    text = f"# Sweep {sweep_dir}\n\n{counts}\n\n{table}"
    try:
        atomic_write_bytes(sweep_dir / "summary.md", text.encode())
    except OSError as error:  # e.g. a full disk: the table is still printed, the sweep fails
        cause = f"{error.strerror or error}: {error.filename or sweep_dir / 'summary.md'}"
        print(f"normlab: error: summary.md not written ({cause})", file=sys.stderr)
        rows.append({"job": "summary.md", "status": "failed", "error": cause})
    print(f"\nSweep summary ({sweep_dir / 'summary.md'}), {counts}:\n{table}", flush=True)
    return rows


def sweep_plan(config: DictConfig) -> dict[str, Any]:
    """The sweep's own overrides and every job's overrides (as Hydra's basic sweeper splits
    them; `jobs` is empty for other sweepers, whose jobs are not known in advance)."""
    overrides = sorted(str(o) for o in config.hydra.overrides.task)
    jobs: list[list[str]] = []
    if str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = config.hydra.sweeper.get("params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(arguments)
        jobs = [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return {"overrides": overrides, "jobs": jobs}


_LOCKS: dict[Path, Any] = {}  # sweep dir -> its lock file, held open by this process


def claim_sweep_dir(sweep_dir: Path, config: DictConfig) -> None:
    """Before a sweep starts: the sweep dir is this sweep's, or one line and exit 2.

    - Another sweep running into the same dir (its lock is held): refused.
    - The dir holds results of a sweep with other overrides (or results of unknown origin):
      refused, nothing is touched.
    - The same sweep run again: it continues (finished jobs are kept, see
      `normlab.run.resume.continue_job`).
    """
    import fcntl
    import json

    from normlab.results.runs import SWEEP_PLAN, job_dirs

    sweep_dir.mkdir(parents=True, exist_ok=True)
    key = sweep_dir.resolve()
    if key not in _LOCKS:
        lock = open(sweep_dir / ".sweep.lock", "a+")  # noqa: SIM115 -- held while the process runs
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            _refuse(f"another sweep is running into {sweep_dir}: wait for it, or choose another "
                    f"hydra.sweep.dir")
        _LOCKS[key] = lock
    plan = sweep_plan(config)
    try:
        before = json.loads((sweep_dir / SWEEP_PLAN).read_text())
    except (OSError, ValueError):
        before = None
    if before is None and job_dirs(sweep_dir):
        _refuse(f"{sweep_dir} already holds job results of another run; choose another "
                f"hydra.sweep.dir (nothing was changed)")
    if before is not None and before.get("overrides") != plan["overrides"]:
        was = " ".join(before.get("overrides") or []) or "(no overrides)"
        _refuse(f"{sweep_dir} holds the results of another sweep ({was}); run that same sweep "
                f"to continue it, or choose another hydra.sweep.dir (nothing was changed)")
    atomic_write_bytes(sweep_dir / SWEEP_PLAN, json.dumps(plan, indent=1).encode())


def _refuse(message: str) -> None:
    print(f"normlab: error: {message}", file=sys.stderr)
    sys.exit(2)


class SweepSummary(Callback):
    """`on_multirun_start`: claim the sweep dir (`claim_sweep_dir`). `on_multirun_end`: write
    `<sweep dir>/summary.md`, print it, exit 1 if a job did not end ok or diverged."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        claim_sweep_dir(Path(config.hydra.sweep.dir), config)
        # The local launcher draws the figures on its warm workers, or runs the jobs in this
        # process, where an import thread would take turns with the job.
        if not str(config.hydra.launcher.get("_target_", "")).endswith("LocalLauncher"):
            _import_in_background(FIGURE_IMPORTS)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        figures = _start_figures(sweep_dir)  # drawn on the workers while the summary is written
        rows = write_summary(sweep_dir)
        figures()
        bad = Counter(str(row.get("status")) for row in rows
                      if row.get("status") not in ("ok", "diverged"))
        if bad:  # the exit code follows the worst outcome: any job not ok/diverged fails the sweep
            jobs = [row["job"] for row in rows if row.get("status") not in ("ok", "diverged")]
            counts = ", ".join(f"{n} job(s) {s}" for s, n in bad.items())
            print(f"normlab: {counts}: {', '.join(jobs)}", file=sys.stderr)
            sys.exit(1)
