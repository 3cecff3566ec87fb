"""Sweep dir -> table (`report.csv`, markdown) and plots (`report_curves.*`, `report_ics.*`).

It reads only what the jobs leave on disk: each job's `metrics.json` and its TensorBoard event
files, never model code. Jobs whose overrides differ only in `seed` form a group; each group's
numbers are the mean and std over its seeds. Failed jobs count in the status columns and add
nothing else, so a partly failed sweep still gets a report; a job whose metrics.json cannot be
read is listed in `Report.skipped`. Each group has one colour in every figure, the colour
TensorBoard gives its first run (`normlab.results.plotstyle`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, works headless
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from normlab.results import runs
from normlab.results.plotstyle import (
    group_colors,
    save_figure,
    seeds_label,
    start_time,
    tensorboard_order,
)
from normlab.results.runs import (
    METRICS_FILE,
    STATUSES,
    job_dirs,
    override_key,
    read_job,
    sorted_layers,
)

METRICS = ("val/acc", "test/acc", "train/acc", "train/loss")
CURVES = {"val/acc": "validation accuracy", "train/loss": "training loss"}
ICS_YLABEL = "input of the nonlinearity\n(p15 / p50 / p85)"
PERCENTILES = ("p15", "p50", "p85")
SEED_KEY = "seed"


@dataclass
class Report:
    """A sweep's report: the per-group table, its markdown form, the files written and one
    line per job whose metrics.json could not be read (counted as failed)."""

    groups: pd.DataFrame
    markdown: str
    files: list[Path]
    skipped: list[str]


def write_report(sweep_dir: Path, out_dir: Path | None = None,
                 formats: Sequence[str] = ("png",)) -> Report:
    """Read `sweep_dir`, write report.csv and report_curves/report_ics in each of `formats`
    (png, pdf, svg) into `out_dir` (default: sweep_dir)."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir or sweep_dir)
    jobs = jobs_frame(sweep_dir)
    if jobs.empty:
        raise ValueError(f"no job dirs (with metrics.json or .hydra/) in {sweep_dir}")
    groups = group_table(jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "report.csv"]
    groups.to_csv(files[0], index=False)
    scalars = job_scalars(sweep_dir, jobs)
    files += save_figure(plot_curves(jobs, scalars), out_dir / "report_curves", formats)
    files += save_figure(plot_ics(jobs, scalars), out_dir / "report_ics", formats)
    skipped = [f"skipped {error}" for error in jobs.loc[jobs["unreadable"], "error"]]
    return Report(groups, markdown_table(groups, common_overrides(jobs)), files, skipped)


# ---------------------------------------------------------------- jobs and groups


def jobs_frame(sweep_dir: Path) -> pd.DataFrame:
    """One row per job: job, seed, group (its overrides without seed), status, error,
    unreadable (metrics.json there but not readable), started (when TensorBoard says its run
    started), metrics, ics/*."""
    rows = [_job_row(job_dir) for job_dir in job_dirs(Path(sweep_dir))]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    common = set(common_overrides(frame))
    frame["group"] = [
        " ".join(o for o in overrides if o not in common) or "(all jobs)"
        for overrides in frame["overrides"]
    ]
    return frame


def _job_row(job_dir: Path) -> dict[str, Any]:
    job = read_job(job_dir)
    overrides = [str(o) for o in job.get("overrides") or []]
    seeds = [o.split("=", 1)[1] for o in overrides if override_key(o) == SEED_KEY]
    row = {
        "job": job_dir.name,
        "seed": seeds[0] if seeds else "",
        "overrides": tuple(o for o in overrides if override_key(o) != SEED_KEY),
        "status": job.get("status", "unknown"),
        "error": str(job.get("error") or ""),
        "unreadable": _unreadable(job_dir, job),
        "started": start_time(job_dir),
    }
    row.update({m: _number(job.get(m)) for m in METRICS})
    for layer, numbers in (job.get("ics") or {}).items():
        row.update({f"ics/{layer}/{name}": _number(v) for name, v in numbers.items()})
    return row


def _unreadable(job_dir: Path, job: dict[str, Any]) -> bool:
    """Is metrics.json there but unreadable? `read_job` then returns a failed record whose
    error line starts with the file's path."""
    path = job_dir / METRICS_FILE
    return path.is_file() and str(job.get("error") or "").startswith(str(path))


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def common_overrides(jobs: pd.DataFrame) -> list[str]:
    """Overrides (seed aside) that every job shares, in the first job's order."""
    lists = list(jobs["overrides"])
    shared = set(lists[0]).intersection(*lists[1:]) if len(lists) > 1 else set()
    return [o for o in lists[0] if o in shared]


def group_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per group: overrides, seeds, mean and std of every metric, status counts."""
    order = list(dict.fromkeys(jobs["group"]))  # groups in job order
    numeric = [c for c in jobs.columns if c in METRICS or c.startswith("ics/")]
    by_group = jobs.groupby("group", sort=False)
    table = pd.DataFrame({
        "overrides": by_group["overrides"].first().map(" ".join),
        "n_seeds": by_group["job"].size(),
        "seeds": by_group["seed"].agg(lambda s: " ".join(map(str, s))),
    }).reindex(order)
    means, stds = by_group[numeric].mean(), by_group[numeric].std()
    for column in numeric:
        table[f"{column} mean"] = means[column]
        table[f"{column} std"] = stds[column]
    statuses = [*STATUSES, *sorted(set(jobs["status"]) - set(STATUSES))]
    counts = pd.crosstab(jobs["group"], jobs["status"]).reindex(
        index=order, columns=statuses, fill_value=0
    )
    for status in statuses:
        table[f"n_{status}"] = counts[status]
    return table.rename_axis("group").reset_index()


# ---------------------------------------------------------------- markdown


def markdown_table(groups: pd.DataFrame, common: list[str] | None = None) -> str:
    """Markdown: one row per group with `mean ± std` over seeds and status counts, then the ICS
    summary numbers (seed means) one row per group and layer."""
    header = ["group", "seeds", *METRICS, "status"]
    rows = [
        [str(row["group"]), str(row["n_seeds"]), *(_mean_std(row, m) for m in METRICS),
         _status_counts(row)]
        for _, row in groups.iterrows()
    ]
    prefix = f"Common overrides: {' '.join(common)}\n\n" if common else ""
    return prefix + _markdown(header, rows) + _ics_markdown(groups)


def _ics_markdown(groups: pd.DataFrame) -> str:
    # Columns "ics/<layer>/<name> mean" -> one row per (group, layer), one column per name.
    keys = [c.removesuffix(" mean").split("/")[1:] for c in groups.columns
            if c.startswith("ics/") and c.endswith(" mean")]
    layers, names = list(dict.fromkeys(k[0] for k in keys)), list(dict.fromkeys(k[1] for k in keys))
    if not keys:
        return ""
    rows = [
        [str(row["group"]), layer,
         *(_fmt(row.get(f"ics/{layer}/{n} mean", math.nan)) for n in names)]
        for _, row in groups.iterrows()
        for layer in layers
    ]
    return "\nICS summary (mean over seeds):\n\n" + _markdown(["group", "layer", *names], rows)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    return runs.markdown([dict(zip(header, row, strict=True)) for row in rows], header)


def _mean_std(row: pd.Series, metric: str) -> str:
    mean, std = row[f"{metric} mean"], row[f"{metric} std"]
    if math.isnan(mean):
        return ""
    return _fmt(mean) if math.isnan(std) else f"{_fmt(mean)} ± {_fmt(std)}"


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3g}"


def _status_counts(row: pd.Series) -> str:
    statuses = [c.removeprefix("n_") for c in row.index if c.startswith("n_") and c != "n_seeds"]
    return ", ".join(f"{int(row[f'n_{s}'])} {s}" for s in statuses if row[f"n_{s}"])


# ---------------------------------------------------------------- event files


def job_scalars(sweep_dir: Path, jobs: pd.DataFrame) -> dict[str, dict[str, pd.Series]]:
    """Every job's scalars (`runs.read_scalars`) as pandas: job -> tag -> values indexed by step."""
    return {
        job: {
            tag: pd.Series(points, dtype=float).sort_index()
            for tag, points in runs.read_scalars(sweep_dir / job).items()
        }
        for job in jobs["job"]
    }


def epoch_curve(scalars: dict[str, pd.Series], tag: str) -> pd.Series:
    """A once-per-epoch scalar indexed by epochs completed (1, 2, ...)."""
    series = scalars.get(tag)
    if series is None or series.empty:
        return pd.Series(dtype=float)
    epochs = scalars.get("epoch")
    if epochs is None:  # no epoch scalar: the n-th value is epoch n
        return pd.Series(series.to_numpy(), index=range(1, len(series) + 1))
    return pd.Series(series.to_numpy(), index=epochs.reindex(series.index).to_numpy() + 1)


def ics_layers(scalars: dict[str, dict[str, pd.Series]]) -> list[str]:
    """Layers with all of `ics/<layer>/p15|p50|p85` in some job, in name order."""
    layers = set()
    for tags in scalars.values():
        for tag in tags:
            parts = tag.split("/")
            if len(parts) == 3 and parts[0] == "ics" and parts[2] == "p50" and all(
                f"ics/{parts[1]}/{p}" in tags for p in PERCENTILES
            ):
                layers.add(parts[1])
    return sorted_layers(layers)


# ---------------------------------------------------------------- plots


def _long(jobs: pd.DataFrame, series_of) -> pd.DataFrame:
    """Stack per-job series into (group, x, value) rows."""
    frames = [
        pd.DataFrame({"job": job, "group": group, "x": series.index, "value": series.to_numpy()})
        for job, group in zip(jobs["job"], jobs["group"], strict=True)
        if not (series := series_of(job)).empty
    ]
    return pd.concat(frames) if frames else pd.DataFrame(columns=["job", "group", "x", "value"])


def _band(ax, data: pd.DataFrame, color: str, label: str) -> None:
    """Mean over seeds as a line, mean ± std as a band."""
    stats = data.groupby("x")["value"].agg(["mean", "std"]).fillna({"std": 0.0})
    ax.plot(stats.index, stats["mean"], color=color, label=label, marker=".")
    ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                    color=color, alpha=0.2, linewidth=0)


def group_order(jobs: pd.DataFrame) -> list[str]:
    """Groups in TensorBoard's run order (earliest start, then name): colour i goes to group i."""
    started = jobs["started"] if "started" in jobs else [math.inf] * len(jobs)
    return tensorboard_order(zip(jobs["group"], started, strict=True))


def _seeds_with_data(jobs: pd.DataFrame, data: pd.DataFrame) -> dict[str, int]:
    """Group -> how many of its jobs have a curve in `data` (a `_long` frame with a job column)."""
    return data.groupby("group")["job"].nunique().to_dict() if not data.empty else {}


def _seeds_caption(seeds: dict[str, int]) -> tuple[str, bool]:
    """(caption for the whole figure, whether each group must say its own seed count): one
    caption when every group has the same number of seeds, none when that number is 1."""
    counts = set(seeds.values())
    if len(counts) == 1:
        (n_seeds,) = counts
        return (seeds_label(n_seeds) if n_seeds > 1 else ""), False
    return "", len(counts) > 1


def plot_curves(jobs: pd.DataFrame, scalars: dict[str, dict[str, pd.Series]]) -> Figure:
    """val/acc and train/loss vs epoch: one line per group, a band of ± std over its seeds."""
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    axes = fig.subplots(1, len(CURVES))
    groups = group_order(jobs)
    colors = group_colors(groups)
    handles: dict[str, Any] = {}
    curves = {tag: _long(jobs, lambda job, tag=tag: epoch_curve(scalars[job], tag))
              for tag in CURVES}
    seeds = {g: max(_seeds_with_data(jobs, d).get(g, 0) for d in curves.values()) for g in groups}
    caption, per_group = _seeds_caption({g: n for g, n in seeds.items() if n})
    for ax, (tag, name) in zip(axes, CURVES.items(), strict=True):
        data = curves[tag]
        for group in groups:
            if not (rows := data[data["group"] == group]).empty:
                label = f"{group} ({seeds_label(seeds[group])})" if per_group else group
                _band(ax, rows, colors[group], label)
        ax.set(title=name, xlabel="epoch", ylabel=f"{name} ({tag})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        handles.update({h.get_label(): h for h in ax.get_lines()})
    if handles:
        rows = math.ceil(len(handles) / 3)  # at most 3 columns, rows filled evenly
        fig.legend(handles.values(), handles.keys(), loc="outside lower center",
                   ncols=math.ceil(len(handles) / rows), fontsize="small", frameon=False)
    if caption or per_group:
        fig.suptitle(f"{caption or 'mean'} ± std (band) per group")
    return fig


def plot_ics(jobs: pd.DataFrame, scalars: dict[str, dict[str, pd.Series]]) -> Figure:
    """Per layer: the p15..p85 band and p50 line of the nonlinearity inputs, per group."""
    layers = ics_layers(scalars)
    if not layers:
        return _message_figure(
            "No ICS percentile scalars (ics/<layer>/p15, p50, p85) in this sweep's event files:\n"
            "the runs were made without the ICS callbacks."
        )
    groups = group_order(jobs)
    colors = group_colors(groups)
    # One panel per (group, layer): overlaid bands of several groups are unreadable. The y-axis
    # is shared per layer (column), so the spread of the groups compares by eye.
    fig = Figure(figsize=(1.0 + 4.2 * len(layers), 1.6 + 2.4 * len(groups)), layout="constrained")
    grid = fig.subplots(len(groups), len(layers), squeeze=False, sharex=True, sharey="col")
    seeds = {}
    for row, group in enumerate(groups):
        for col, layer in enumerate(layers):
            ax = grid[row][col]
            n_seeds = _ics_band(ax, jobs[jobs["group"] == group], scalars, layer, colors[group])
            seeds[(group, layer)] = n_seeds
            ax.set_title(f"{group}: {layer}", fontsize="medium")
            ax.grid(alpha=0.3)
        grid[row][0].set_ylabel(ICS_YLABEL)
    caption, per_panel = _seeds_caption({k: n for k, n in seeds.items() if n})
    for (row, group), (col, layer) in product(enumerate(groups), enumerate(layers)):
        if per_panel and seeds[(group, layer)]:
            ax = grid[row][col]
            ax.set_title(f"{ax.get_title()} ({seeds_label(seeds[(group, layer)])})",
                         fontsize="medium")
    for col in range(len(layers)):
        grid[-1][col].set_xlabel("optimizer step")
    fig.suptitle("Input of each nonlinearity on the probe batch, per group and layer"
                 + (f" ({caption})" if caption else ""))
    fig.legend(handles=[Line2D([], [], color="0.3", label="p50 (median)"),
                        Patch(facecolor="0.3", alpha=0.15, edgecolor="0.3", linestyle="--",
                              label="p15 to p85")],
               loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    return fig


def _ics_band(ax, jobs: pd.DataFrame, scalars, layer: str, color: str) -> int:
    """Seed-mean percentiles of one group: p15..p85 shaded, p50 as a line. Returns how many
    seeds (jobs) had the layer's p50."""
    empty = pd.Series(dtype=float)
    frames = {
        p: _long(jobs, lambda job, p=p: scalars[job].get(f"ics/{layer}/{p}", empty))
        for p in PERCENTILES
    }
    mean = {p: frame.groupby("x")["value"].mean() for p, frame in frames.items()}
    if mean["p50"].empty:
        return 0
    low, high = mean["p15"], mean["p85"]
    ax.fill_between(low.index, low, high, color=color, alpha=0.18, linewidth=0)
    for edge in (low, high):
        ax.plot(edge.index, edge, color=color, linewidth=0.8, linestyle="--")
    ax.plot(mean["p50"].index, mean["p50"], color=color, linewidth=1.8)
    return int(frames["p50"]["job"].nunique())


def _message_figure(text: str) -> Figure:
    fig = Figure(figsize=(8, 2.5))
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig
