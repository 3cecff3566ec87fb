"""Hydra callback that closes a sweep: one summary row per job, printed and saved as summary.md.

It reads each job's `metrics.json`, so it works the same for every launcher (in-process,
joblib workers, SLURM). A job dir without `metrics.json` (its process was killed) counts as
failed. A sweep in which any job failed exits non-zero after the summary.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normlab.atomic import atomic_write_bytes

COLUMNS = ("job", "overrides", "status", "val/acc", "test/acc", "train_seconds")
# ICS numbers of the last hidden layer (the BN paper's Fig. 1 layer), from metrics.json "ics".
ICS_COLUMNS = ("p50_travel", "grad_shift_mean")
NO_METRICS = "no metrics.json: the job process died before writing it (killed? out of memory?)"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job dirs of a sweep (those Hydra set up, or that wrote metrics.json), in job order."""
    if not sweep_dir.is_dir():
        return []
    found = [
        d
        for d in sweep_dir.iterdir()
        if d.is_dir() and ((d / "metrics.json").is_file() or (d / ".hydra").is_dir())
    ]
    return sorted(found, key=lambda d: _job_key(d.name))


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """`metrics.json` of every job under `sweep_dir`, with its job dir name under `job`."""
    return [{"job": d.name, **read_job(d)} for d in job_dirs(sweep_dir)]


def read_job(job_dir: Path) -> dict[str, Any]:
    """A job's metrics.json, or a `failed` record when the job never wrote one."""
    path = job_dir / "metrics.json"
    error = NO_METRICS
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as problem:  # one bad file must not sink the whole sweep
            error = f"unreadable metrics.json: {' '.join(str(problem).split())[:120]}"
            print(f"normlab: {path}: {error}; counted as failed", file=sys.stderr)
    overrides = job_dir / ".hydra" / "overrides.yaml"
    listed = OmegaConf.to_container(OmegaConf.load(overrides)) if overrides.is_file() else []
    return {"status": "failed", "error": error, "overrides": listed}


def _job_key(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(value) or "(defaults)"
    return "" if value is None else str(value)


def _status_cell(row: dict[str, Any]) -> str:
    status = row.get("status", "")
    if status == "failed" and row.get("error"):
        return f"failed: {row['error']}".replace("|", "/")
    if status == "interrupted" and row.get("signal"):
        return f"interrupted ({row['signal']})"
    if status == "diverged" and row.get("diverged_at_step") is not None:
        return f"diverged at step {row['diverged_at_step']}"
    return _cell(status)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per job; a failed job shows its error line."""
    header = [*COLUMNS, *(f"last layer {name}" for name in ICS_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_cell(row.get(c)) for c in COLUMNS]
        cells[COLUMNS.index("status")] = _status_cell(row)
        last = _last_hidden_layer(row.get("ics") or {})
        cells += [_cell(last.get(name)) for name in ICS_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _last_hidden_layer(ics: dict[str, dict[str, float]]) -> dict[str, float]:
    hidden = [name for name in ics if name.startswith("layer") and name[5:].isdigit()]
    return ics[max(hidden, key=lambda name: int(name[5:]))] if hidden else {}


def status_line(rows: list[dict[str, Any]]) -> str:
    """E.g. `4 jobs: 2 ok, 1 diverged, 1 failed`."""
    counts = Counter(row.get("status", "unknown") for row in rows)
    parts = [f"{counts[s]} {s}" for s in ("ok", "diverged", "failed") if counts[s]]
    parts += [f"{n} {s}" for s, n in counts.items() if s not in ("ok", "diverged", "failed")]
    return f"{len(rows)} jobs: {', '.join(parts)}"


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write `<sweep dir>/summary.md` for the jobs found there, print it, return its rows.
    Also called by normlab.cli when a signal stops a sweep before Hydra's end of the sweep."""
    rows = collect_jobs(sweep_dir)
    table = summary_table(rows)
    counts = status_line(rows)
    atomic_write_bytes(
        sweep_dir / "summary.md", f"# Sweep {sweep_dir}\n\n{counts}\n\n{table}".encode()
    )
    print(f"\nSweep summary ({sweep_dir / 'summary.md'}), {counts}:\n{table}", flush=True)
    return rows


class SweepSummary(Callback):
    """`on_multirun_end`: write `<sweep dir>/summary.md`, print it, exit 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = write_summary(Path(config.hydra.sweep.dir))
        failed = [row["job"] for row in rows if row.get("status") == "failed"]
        if failed:
            print(f"normlab: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)
