"""Hydra callback that closes a sweep: one summary row per job, printed and saved as summary.md.

It reads each job's `metrics.json`, so it works the same for every launcher (in-process,
joblib workers, SLURM). A job dir without `metrics.json` (its process was killed) counts as
failed. A sweep in which any job failed exits non-zero after the summary.
"""

from __future__ import annotations

import sys
from collections import Counter
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


def _write_figures(sweep_dir: Path) -> None:
    """The comparison figures into TensorBoard; a figure must never fail the sweep."""
    from normlab.results import dashboard

    try:
        dashboard.write_sweep_figures(sweep_dir)
    except Exception as error:  # e.g. no event files at all (logger=csv)
        print(f"normlab: no comparison figure in TensorBoard: {error}", file=sys.stderr)
    print(dashboard.tensorboard_hint(sweep_dir), flush=True)


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
    atomic_write_bytes(sweep_dir / "summary.md", text.encode())
    print(f"\nSweep summary ({sweep_dir / 'summary.md'}), {counts}:\n{table}", flush=True)
    return rows


class SweepSummary(Callback):
    """`on_multirun_end`: write `<sweep dir>/summary.md`, print it, exit 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        _write_figures(sweep_dir)
        failed = [row["job"] for row in rows if row.get("status") == "failed"]
        if failed:
            print(f"normlab: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)
