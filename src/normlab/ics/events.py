"""Read scalars back from TensorBoard event files (what rank 0 logged), by tag and step."""

from __future__ import annotations

from pathlib import Path

Series = dict[str, dict[int, float]]  # tag -> {optimizer step: value}


def read_scalars(directory: Path | str, prefix: str = "") -> Series:
    """Every scalar whose tag starts with `prefix` in the event files under `directory`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: Series = {}
    for folder in sorted({p.parent for p in Path(directory).rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if tag.startswith(prefix):
                points = series.setdefault(tag, {})
                points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return series
