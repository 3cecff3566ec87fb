"""Base for ICS callbacks that summarize what they logged into `metrics.json` (`ics_summary`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from normlab.ics.events import Series, read_scalars


class RecordingCallback(pl.Callback):
    """Keeps every scalar it logged (`tag -> {step: value}`) for its `ics_summary()`.

    The record is part of the callback's checkpoint state, so a resumed run summarizes the whole
    run. Under `ddp_spawn` training happens in child processes and this object (in the parent)
    never sees a value: it then reads back what rank 0 wrote to the event files under
    `output_dir`, or summarizes nothing when no `output_dir` was given.
    """

    def __init__(self, output_dir: str | Path | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.history: Series = {}

    def record(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.history.setdefault(tag, {})[step] = value

    def series(self) -> Series:
        """What was logged here, or (not trained in this process) what the event files hold."""
        if self.history or self.output_dir is None or not self.output_dir.exists():
            return self.history
        return read_scalars(self.output_dir, prefix="ics/")

    def state_dict(self) -> dict[str, Any]:
        return {"history": {tag: dict(points) for tag, points in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {tag: dict(points) for tag, points in state_dict.get("history", {}).items()}
