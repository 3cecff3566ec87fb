"""How every figure looks and is saved: one colour per group (the colour TensorBoard gives the
same run), the seeds caption, the file formats and the resolution.

TensorBoard (2.21) colours runs in the order `/data/runs` lists them: by start time (the
wall time of the run's first event), ties broken by run name (`plugins/core/core_plugin.py`,
`_serve_runs`); the i-th run gets colour i of the palette, cycling. The figures order their
groups the same way (by the earliest start time of the group's runs, then by name), so a sweep
with one run per group (no seeds swept) has the same colour for a group in the report, in
fig1 and on TensorBoard's Time Series page. With several seeds per group TensorBoard colours
each seed on its own; the figures keep one colour per group.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from matplotlib.figure import Figure

from normlab.results.checksums import use_native_crc32c

# The Time Series dashboard's default run palette (light theme), from the installed package's
# tensorboard/webfiles.zip, index.js: settings colorPalette {id:"default", colors: Slate, Cyan,
# Pink, Yellow, Purple, Light Green, Orange}. The legacy Polymer dashboards (custom scalars)
# still use their own `tensorboardColorBlindAssist` palette from the same file.
TENSORBOARD_PALETTE = (
    "#425066",  # Slate
    "#12b5cb",  # Cyan
    "#e52592",  # Pink
    "#f9ab00",  # Yellow
    "#9334e6",  # Purple
    "#7cb342",  # Light Green
    "#e8710a",  # Orange
)
EVENT_GLOB = "events.out.tfevents.*"
FORMATS = ("png", "pdf", "svg")
PNG_DPI = 200


def start_time(run_dir: Path | str) -> float:
    """When TensorBoard says the run started: the wall time of the first event of the first
    event file (in name order) under `run_dir`; +inf without event files (listed last)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    use_native_crc32c()
    for path in sorted(Path(run_dir).rglob(EVENT_GLOB)):
        try:
            for event in EventFileLoader(str(path)).Load():
                return float(event.wall_time)
        except (OSError, ValueError):  # a truncated or unreadable file: try the next one
            continue
    return math.inf


def tensorboard_order(starts: Iterable[tuple[str, float]]) -> list[str]:
    """Group names from `(group, start time of one of its runs)` pairs, in TensorBoard's run
    order: by the group's earliest start time, then by name."""
    earliest: dict[str, float] = {}
    for group, started in starts:
        earliest[group] = min(earliest.get(group, math.inf), _or_inf(started))
    return sorted(earliest, key=lambda group: (earliest[group], group))


def group_colors(ordered_groups: Iterable[str]) -> dict[str, str]:
    """Group -> hex colour: the i-th group gets TensorBoard's i-th run colour."""
    return {
        group: TENSORBOARD_PALETTE[i % len(TENSORBOARD_PALETTE)]
        for i, group in enumerate(ordered_groups)
    }


def _or_inf(value: float | None) -> float:
    return math.inf if value is None or math.isnan(value) else float(value)


def seeds_label(n_seeds: int) -> str:
    """`mean of 3 seeds`; `1 seed` when there is nothing to average."""
    return f"mean of {n_seeds} seeds" if n_seeds > 1 else f"{n_seeds} seed"


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    """`"png,pdf"` (or a list) -> `("png", "pdf")`; ValueError naming a format we cannot write."""
    names = text.split(",") if isinstance(text, str) else list(text)
    formats = tuple(dict.fromkeys(n.strip().lower().lstrip(".") for n in names if n.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"format: {','.join(bad) or repr(text)} is not one of "
                         f"{', '.join(FORMATS)} (give a comma list, e.g. png,pdf)")
    return formats


def save_figure(fig: Figure, path: Path | str, formats: Iterable[str] = ("png",)) -> list[Path]:
    """Write `fig` once per format beside `path` (its suffix replaced); PNG at PNG_DPI."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in parse_formats(formats):
        out = path.with_suffix(f".{fmt}")
        fig.savefig(out, format=fmt, dpi=PNG_DPI if fmt == "png" else "figure",
                    bbox_inches="tight", metadata=_metadata(fmt))
        written.append(out)
    return written


def _metadata(fmt: str) -> dict[str, str | None]:
    # No creation date in PDF/SVG: the same sweep gives byte-identical files.
    return {"png": {}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[fmt]
