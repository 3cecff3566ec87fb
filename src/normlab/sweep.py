"""Hydra callback that closes a sweep: one summary row per job, printed and saved as summary.md.

It reads each job's `metrics.json`, so it works the same for every launcher (in-process,
joblib workers, SLURM). A sweep in which any job failed exits non-zero after the summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = ("job", "overrides", "status", "val/acc", "test/acc", "train_seconds")


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """`metrics.json` of every job under `sweep_dir`, with its job dir name under `job`."""
    rows = []
    for path in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: _job_key(p.parent.name)):
        metrics = json.loads(path.read_text())
        rows.append({"job": path.parent.name, **metrics})
    return rows


def _job_key(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(value) or "(defaults)"
    return "" if value is None else str(value)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per job; a failed job shows its error line."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(row.get(c)) for c in COLUMNS]
        if row.get("status") == "failed" and row.get("error"):
            cells[2] = f"failed: {row['error']}".replace("|", "/")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """`on_multirun_end`: write `<sweep dir>/summary.md`, print it, exit 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_jobs(sweep_dir)
        table = summary_table(rows)
        (sweep_dir / "summary.md").write_text(f"# Sweep {sweep_dir}\n\n{table}")
        print(f"\nSweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
        failed = [row["job"] for row in rows if row.get("status") == "failed"]
        if failed:
            print(f"normlab: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)
