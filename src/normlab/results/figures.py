"""The BN paper's Fig. 1 from run directories: (a) accuracy vs step, then, per norm, the
p15/p50/p85 of the last hidden layer's nonlinearity input vs step.

Reads only what runs left on disk (event files, `.hydra/config.yaml`, `metrics.json`), never
model code. Each norm has one colour (the one TensorBoard gives its first run, see
`normlab.results.plotstyle`): p50 solid, p15 and p85 dashed around a light band; with several
seeds the lines are seed means and each seed's p50 is drawn thin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend, works headless
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from normlab.results.plotstyle import (
    group_colors,
    save_figure,
    seeds_label,
    start_time,
    tensorboard_order,
)
from normlab.results.runs import (
    Series,
    last_hidden_layer,
    layers_with,
    mean_curve,
    parse_overrides,
    read_choices,
    read_config,
    read_job,
    read_scalars,
    run_dirs,
)

PERCENTILE_STYLE = {"p15": "--", "p50": "-", "p85": "--"}  # line style; colour = the norm's
YLABEL = "input of the nonlinearity (p15 / p50 / p85)"


@dataclass(frozen=True)
class RunCurves:
    directory: Path
    norm: str
    seed: int | None
    series: Series
    started: float = math.inf  # when TensorBoard says the run started (orders the colours)

    @property
    def group(self) -> str:
        """The report's name for the run's group (`norm=bn`): same name, same colour."""
        return f"norm={self.norm}"


def describe(run_dir: Path) -> tuple[str, int | None]:
    """(norm name, seed) of a run, from Hydra's saved config or the recorded overrides."""
    cfg = read_config(run_dir)
    if cfg is not None:
        return read_choices(run_dir).get("norm", "run"), cfg.get("seed")
    overrides = parse_overrides(read_job(run_dir).get("overrides", []))
    seed = overrides.get("seed")
    return overrides.get("norm", "run"), int(seed) if seed and seed.isdigit() else None


def load_runs(paths: Sequence[Path | str]) -> list[RunCurves]:
    """Curves of every run found under `paths` (see `run_dirs`)."""
    runs = []
    for directory in run_dirs(paths):
        norm, seed = describe(directory)
        series = read_scalars(directory)
        runs.append(RunCurves(directory, norm, seed, series, start_time(directory)))
    return runs


def by_norm(runs: Sequence[RunCurves]) -> dict[str, list[RunCurves]]:
    """Runs grouped by norm, in the order the sweep ran them (`norm=none,bn`: the paper's left
    panel first)."""
    groups: dict[str, list[RunCurves]] = {}
    for run in sorted(runs, key=lambda r: r.seed or 0):
        groups.setdefault(run.norm, []).append(run)
    return groups


def tag_mean(runs: Sequence[RunCurves], tag: str) -> tuple[list[int], list[float]]:
    """Mean over the runs that logged `tag`, at the steps all of them logged it at."""
    return mean_curve(run.series.get(tag, {}) for run in runs)


def deepest_layer(runs: Sequence[RunCurves]) -> str:
    """The last hidden layer that has ICS percentiles in some run."""
    layer = last_hidden_layer(name for run in runs for name in layers_with(run.series, "p50"))
    if layer is None:
        raise ValueError("no ics/<layer>/p50 scalars in these runs: were the ICS callbacks on?")
    return layer


def norm_colors(runs: Sequence[RunCurves]) -> dict[str, str]:
    """Norm -> colour, by the rule every figure and TensorBoard's run list share."""
    order = tensorboard_order((run.group, run.started) for run in runs)
    colors = group_colors(order)
    return {run.norm: colors[run.group] for run in runs}


def fig1_figure(runs: Sequence[RunCurves], layer: str | None = None) -> Figure:
    """(a) validation accuracy per norm, then one panel of percentiles per norm, shared y."""
    if not runs:
        raise ValueError("no runs to draw")
    layer = layer or deepest_layer(runs)
    groups, colors = by_norm(runs), norm_colors(runs)
    fig = Figure(figsize=(4.2 * (1 + len(groups)), 4.2), layout="constrained")
    axes = fig.subplots(1, 1 + len(groups))
    _accuracy_panel(axes[0], groups, colors)
    for ax in axes[2:]:
        ax.sharey(axes[1])  # one scale, so the spread with and without BN compares by eye
    for index, (ax, (norm, group)) in enumerate(zip(axes[1:], groups.items(), strict=True)):
        _percentile_panel(ax, f"({'bcdefgh'[index]})", norm, group, layer, colors[norm])
    axes[1].set_ylabel(YLABEL)
    styles = [Line2D([], [], color="0.5", lw=1.8, label="p50 (median)"),
              Line2D([], [], color="0.5", lw=0.9, ls="--", label="p15 / p85"),
              Patch(facecolor="0.5", alpha=0.15, label="p15 to p85 band")]
    norms = [Line2D([], [], color=colors[norm], lw=1.8, label=_norm_label(norm, group))
             for norm, group in groups.items()]
    fig.legend(handles=norms + styles, loc="outside lower center", ncols=len(norms) + 3,
               fontsize="small", frameon=False)
    return fig


def draw_fig1(runs: Sequence[RunCurves], out: Path | str, layer: str | None = None,
              formats: Sequence[str] = ("png",)) -> Path:
    """Write the figure to `out` in each of `formats` (its suffix replaced; PNG at 200 dpi)
    and return the first file written."""
    return save_figure(fig1_figure(runs, layer), Path(out), formats)[0]


def _norm_label(norm: str, group: Sequence[RunCurves]) -> str:
    return f"norm={norm} ({seeds_label(len(group))})" if len(group) > 1 else f"norm={norm}"


def _accuracy_panel(ax, groups: dict[str, list[RunCurves]], colors: dict[str, str]) -> None:
    tag = "val/acc"
    for norm, group in groups.items():
        steps, values = tag_mean(group, tag)
        ax.plot(steps, values, color=colors[norm], lw=1.8, label=_norm_label(norm, group))
    ax.set(title="(a) validation accuracy", xlabel="optimizer step",
           ylabel=f"validation accuracy ({tag})")
    ax.grid(alpha=0.3)


def _percentile_panel(ax, panel: str, norm: str, group: list[RunCurves], layer: str,
                      color: str) -> None:
    means = {name: tag_mean(group, f"ics/{layer}/{name}") for name in PERCENTILE_STYLE}
    if len(group) > 1:
        for run in group:
            points = sorted(run.series.get(f"ics/{layer}/p50", {}).items())
            ax.plot([s for s, _ in points], [v for _, v in points], color=color, alpha=0.3,
                    lw=0.7)
    (low_steps, low), (high_steps, high) = means["p15"], means["p85"]
    if low_steps == high_steps and low_steps:
        ax.fill_between(low_steps, low, high, color=color, alpha=0.15, linewidth=0)
    for name, style in PERCENTILE_STYLE.items():
        steps, values = means[name]
        ax.plot(steps, values, color=color, ls=style, lw=1.8 if name == "p50" else 0.9,
                label=name)
    ax.set(title=f"{panel} norm={norm}: input of {layer}'s nonlinearity", xlabel="optimizer step")
    ax.grid(alpha=0.3)
