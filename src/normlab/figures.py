"""The BN paper's Fig. 1 from run directories: (a) accuracy vs step, then, per norm, the
p15/p50/p85 of the last hidden layer's nonlinearity input vs step.

Reads only what runs left on disk (event files, `.hydra/config.yaml`, `metrics.json`), never
model code. Several seeds of one norm are drawn thin, their mean thick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from normlab.runs import (
    Series,
    last_hidden_layer,
    layers_with,
    parse_overrides,
    read_config,
    read_job,
    read_scalars,
    run_dirs,
)

PERCENTILE_STYLE = {"p85": "tab:red", "p50": "tab:blue", "p15": "tab:green"}


@dataclass(frozen=True)
class RunCurves:
    directory: Path
    norm: str
    seed: int | None
    series: Series


def describe(run_dir: Path) -> tuple[str, int | None]:
    """(norm name, seed) of a run, from Hydra's saved config or the recorded overrides."""
    cfg = read_config(run_dir)
    if cfg is not None:
        from omegaconf import OmegaConf

        return str(OmegaConf.select(cfg, "norm.name", default="run")), cfg.get("seed")
    overrides = parse_overrides(read_job(run_dir).get("overrides", []))
    seed = overrides.get("seed")
    return overrides.get("norm", "run"), int(seed) if seed and seed.isdigit() else None


def load_runs(paths: Sequence[Path | str]) -> list[RunCurves]:
    """Curves of every run found under `paths` (see `run_dirs`)."""
    runs = []
    for directory in run_dirs(paths):
        norm, seed = describe(directory)
        runs.append(RunCurves(directory, norm, seed, read_scalars(directory)))
    return runs


def by_norm(runs: Sequence[RunCurves]) -> dict[str, list[RunCurves]]:
    """Runs grouped by norm, `none` first (the paper's left panel)."""
    groups: dict[str, list[RunCurves]] = {}
    for run in sorted(runs, key=lambda r: (r.norm != "none", r.norm, r.seed or 0)):
        groups.setdefault(run.norm, []).append(run)
    return groups


def mean_curve(runs: Sequence[RunCurves], tag: str) -> tuple[list[int], list[float]]:
    """Mean over runs at the steps every run logged `tag` at."""
    curves = [run.series[tag] for run in runs if tag in run.series]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [sum(c[s] for c in curves) / len(curves) for s in steps]


def deepest_layer(runs: Sequence[RunCurves]) -> str:
    """The last hidden layer that has ICS percentiles in some run."""
    layer = last_hidden_layer(name for run in runs for name in layers_with(run.series, "p50"))
    if layer is None:
        raise ValueError("no ics/<layer>/p50 scalars in these runs: were the ICS callbacks on?")
    return layer


def draw_fig1(runs: Sequence[RunCurves], out: Path | str, layer: str | None = None) -> Path:
    """Write the figure as a PNG to `out` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("no runs to draw")
    layer = layer or deepest_layer(runs)
    groups = by_norm(runs)
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(4.3 * (1 + len(groups)), 3.6))
    _accuracy_panel(axes[0], groups)
    for ax in axes[2:]:
        ax.sharey(axes[1])  # one scale, so the spread with and without BN compares by eye
    for ax, (norm, group) in zip(axes[1:], groups.items(), strict=True):
        _percentile_panel(ax, norm, group, layer)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _accuracy_panel(ax, groups: dict[str, list[RunCurves]]) -> None:
    tag = "val/acc"
    for norm, group in groups.items():
        steps, values = mean_curve(group, tag)
        ax.plot(steps, values, label=f"norm={norm} (n={len(group)})")
    ax.set(title="(a) validation accuracy", xlabel="optimizer step", ylabel=tag)
    ax.grid(alpha=0.3)
    ax.legend()


def _percentile_panel(ax, norm: str, group: list[RunCurves], layer: str) -> None:
    for name, color in PERCENTILE_STYLE.items():
        tag = f"ics/{layer}/{name}"
        for run in group:
            points = sorted(run.series.get(tag, {}).items())
            ax.plot([s for s, _ in points], [v for _, v in points], color=color, alpha=0.25, lw=0.8)
        steps, values = mean_curve(group, tag)
        ax.plot(steps, values, color=color, lw=1.8, label=name)
    panel = "b" if norm == "none" else "c"
    ax.set(
        title=f"({panel}) norm={norm}: input of {layer}'s nonlinearity",
        xlabel="optimizer step", ylabel="percentile on the probe batch",
    )
    ax.grid(alpha=0.3)
    ax.legend()
