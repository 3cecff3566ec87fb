"""Sweep dir -> table (`report.csv`, markdown) and plots (`report_curves.png`, `report_ics.png`).

It reads only what the jobs leave on disk: each job's `metrics.json` and its TensorBoard event
files, never model code. Jobs whose overrides differ only in `seed` form a group; each group's
numbers are the mean and std over its seeds. Failed jobs count in the status columns and add
nothing else, so a partly failed sweep still gets a report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, works headless
from matplotlib.ticker import MaxNLocator

from normlab import runs
from normlab.runs import STATUSES, collect_jobs, override_key, sorted_layers

METRICS = ("val/acc", "test/acc", "train/acc", "train/loss")
CURVES = ("val/acc", "train/loss")
PERCENTILES = ("p15", "p50", "p85")
SEED_KEY = "seed"


@dataclass
class Report:
    """A sweep's report: the per-group table, its markdown form and the files written."""

    groups: pd.DataFrame
    markdown: str
    files: list[Path]


def write_report(sweep_dir: Path, out_dir: Path | None = None) -> Report:
    """Read `sweep_dir`, write report.csv and report_*.png into `out_dir` (default: sweep_dir)."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir or sweep_dir)
    jobs = jobs_frame(sweep_dir)
    if jobs.empty:
        raise ValueError(f"no job dirs (with metrics.json or .hydra/) in {sweep_dir}")
    groups = group_table(jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "report.csv", out_dir / "report_curves.png", out_dir / "report_ics.png"]
    groups.to_csv(files[0], index=False)
    scalars = {job: read_scalars(sweep_dir / job) for job in jobs["job"]}
    plot_curves(jobs, scalars).savefig(files[1], dpi=120)
    plot_ics(jobs, scalars).savefig(files[2], dpi=120)
    return Report(groups, markdown_table(groups, common_overrides(jobs)), files)


# ---------------------------------------------------------------- jobs and groups


def jobs_frame(sweep_dir: Path) -> pd.DataFrame:
    """One row per job: job, seed, group (its overrides without seed), status, metrics, ics/*."""
    rows = [_job_row(job) for job in collect_jobs(Path(sweep_dir))]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    common = set(common_overrides(frame))
    frame["group"] = [
        " ".join(o for o in overrides if o not in common) or "(all jobs)"
        for overrides in frame["overrides"]
    ]
    return frame


def _job_row(job: dict[str, Any]) -> dict[str, Any]:
    overrides = [str(o) for o in job.get("overrides") or []]
    seeds = [o.split("=", 1)[1] for o in overrides if override_key(o) == SEED_KEY]
    row = {
        "job": job["job"],
        "seed": seeds[0] if seeds else "",
        "overrides": tuple(o for o in overrides if override_key(o) != SEED_KEY),
        "status": job.get("status", "unknown"),
    }
    row.update({m: _number(job.get(m)) for m in METRICS})
    for layer, numbers in (job.get("ics") or {}).items():
        row.update({f"ics/{layer}/{name}": _number(v) for name, v in numbers.items()})
    return row


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


def read_scalars(job_dir: Path) -> dict[str, pd.Series]:
    """Every scalar tag in the job's event files: tag -> values indexed by step."""
    return {
        tag: pd.Series(points, dtype=float).sort_index()
        for tag, points in runs.read_scalars(job_dir).items()
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
        pd.DataFrame({"group": group, "x": series.index, "value": series.to_numpy()})
        for job, group in zip(jobs["job"], jobs["group"], strict=True)
        if not (series := series_of(job)).empty
    ]
    return pd.concat(frames) if frames else pd.DataFrame(columns=["group", "x", "value"])


def _band(ax, data: pd.DataFrame, color: str, label: str) -> None:
    """Mean over seeds as a line, mean ± std as a band."""
    stats = data.groupby("x")["value"].agg(["mean", "std"]).fillna({"std": 0.0})
    ax.plot(stats.index, stats["mean"], color=color, label=label, marker=".")
    ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                    color=color, alpha=0.2, linewidth=0)


def _colors(groups: list[str]) -> dict[str, str]:
    return {g: f"C{i % 10}" for i, g in enumerate(groups)}


def plot_curves(jobs: pd.DataFrame, scalars: dict[str, dict[str, pd.Series]]) -> Figure:
    """val/acc and train/loss vs epoch: one line per group, a band of ± std over its seeds."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, len(CURVES))
    groups = list(dict.fromkeys(jobs["group"]))
    colors = _colors(groups)
    for ax, tag in zip(axes, CURVES, strict=True):
        data = _long(jobs, lambda job, tag=tag: epoch_curve(scalars[job], tag))
        for group in groups:
            if not (rows := data[data["group"] == group]).empty:
                _band(ax, rows, colors[group], group)
        ax.set(title=tag, xlabel="epoch", ylabel=tag)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if any(ax.has_data() for ax in axes):
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
                   ncols=min(len(groups), 3), fontsize="small")
    return fig


def plot_ics(jobs: pd.DataFrame, scalars: dict[str, dict[str, pd.Series]]) -> Figure:
    """Per layer: the p15..p85 band and p50 line of the nonlinearity inputs, per group."""
    layers = ics_layers(scalars)
    if not layers:
        return _message_figure(
            "No ICS percentile scalars (ics/<layer>/p15, p50, p85) in this sweep's event files:\n"
            "the runs were made without the ICS callbacks."
        )
    groups = list(dict.fromkeys(jobs["group"]))
    colors = _colors(groups)
    # One panel per (group, layer): overlaid bands of several groups are unreadable.
    fig = Figure(figsize=(4.5 * len(layers), 1.2 + 2.2 * len(groups)), layout="constrained")
    grid = fig.subplots(len(groups), len(layers), squeeze=False, sharex=True, sharey="col")
    for row, group in enumerate(groups):
        for col, layer in enumerate(layers):
            ax = grid[row][col]
            _ics_band(ax, jobs[jobs["group"] == group], scalars, layer, colors[group], group)
            ax.grid(alpha=0.3)
        grid[row][0].set_ylabel(group.replace(" ", "\n"), fontsize="small")
    for col, layer in enumerate(layers):
        grid[0][col].set_title(f"{layer}: p15 / p50 / p85")
        grid[-1][col].set_xlabel("optimizer step")
    fig.suptitle("Input of each nonlinearity: seed-mean percentiles per group")
    return fig


def _ics_band(ax, jobs: pd.DataFrame, scalars, layer: str, color: str, label: str) -> None:
    """Seed-mean percentiles of one group: p15..p85 shaded, p50 as a line."""
    empty = pd.Series(dtype=float)
    mean = {
        p: _long(jobs, lambda job, p=p: scalars[job].get(f"ics/{layer}/{p}", empty))
        .groupby("x")["value"].mean()
        for p in PERCENTILES
    }
    if mean["p50"].empty:
        return
    low, high = mean["p15"], mean["p85"]
    ax.fill_between(low.index, low, high, color=color, alpha=0.15, linewidth=0)
    for edge in (low, high):
        ax.plot(edge.index, edge, color=color, linewidth=0.6, linestyle="--")
    ax.plot(mean["p50"].index, mean["p50"], color=color, label=label)


def _message_figure(text: str) -> Figure:
    fig = Figure(figsize=(8, 2.5))
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig
