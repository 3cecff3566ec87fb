"""Depth figures and tables from sweep directories: the `"depth"` entry of each job's
`metrics.json` (per layer: gradient norm, output scale, stable rank, cosine at step 0 and at the
end), grouped by what the jobs' overrides say apart from the seed.

`profile_figure` (gradient norm or rank vs layer index, one line per group, mean over seeds) is
what the TensorBoard landing page shows for any sweep with depth numbers; scripts/depth.py draws
the four depth experiments' figures with the same pieces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from matplotlib.figure import Figure

from normlab.results.runs import job_dirs, parse_overrides, read_choices, read_job, read_overrides

LAYER = re.compile(r"layer(\d+)")


def load_runs(sweep_dirs: Iterable[Path | str]) -> list[dict[str, Any]]:
    """One dict per finished job: `params` (group choices + task overrides, seed included) and
    `metrics` (its metrics.json)."""
    runs = []
    for sweep_dir in sweep_dirs:
        for job in job_dirs(Path(sweep_dir)):
            metrics = read_job(job)
            if metrics.get("status") not in ("ok", "diverged") or not metrics.get("depth"):
                continue
            params = {**read_choices(job), **parse_overrides(read_overrides(job))}
            runs.append({"params": params, "metrics": metrics, "job": str(job)})
    return runs


def layer_values(run: dict[str, Any], key: str) -> list[float]:
    """`key` (e.g. `grad_norm_init`) of layer1, layer2, ... in forward order (head left out)."""
    depth = run["metrics"]["depth"]
    layers = sorted((k for k in depth if LAYER.fullmatch(k)), key=lambda k: int(k[5:]))
    return [depth[k].get(key, math.nan) for k in layers]


def varying(runs: list[dict[str, Any]], ignore: tuple[str, ...] = ("seed",)) -> list[str]:
    """The parameters that differ between runs (the seed left out), in first-seen order."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run["params"] if k not in keys and k not in ignore]
    return [k for k in keys if len({str(r["params"].get(k)) for r in runs}) > 1]


def group_label(run: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k.split('.')[-1]}={run['params'].get(k)}" for k in keys) or "all"


def groups(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Runs by their values of `keys`, in first-seen order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(group_label(run, keys), []).append(run)
    return out


def mean_profile(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Layer by layer, the mean of `key` over `runs` (geometric for positive numbers: gradient
    norms span orders of magnitude)."""
    profiles = [layer_values(r, key) for r in runs]
    n = min(len(p) for p in profiles)
    out = []
    for i in range(n):
        values = [p[i] for p in profiles if math.isfinite(p[i])]
        if not values:
            out.append(math.nan)
        elif all(v > 0 for v in values):
            out.append(math.exp(fmean(math.log(v) for v in values)))
        else:
            out.append(fmean(values))
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return fmean(values), (stdev(values) if len(values) > 1 else 0.0)


def fmt(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}g} ± {std:.{digits - 1}g}"


def profile_figure(
    runs: list[dict[str, Any]],
    panels: dict[str, tuple[str, bool]],
    keys: list[str] | None = None,
    title: str = "",
) -> Figure:
    """One panel per `{title: (key, log scale)}`: `key` vs layer index, one line per group."""
    from normlab.results.plotstyle import TENSORBOARD_PALETTE

    keys = varying(runs) if keys is None else keys
    by_group = groups(runs, keys)
    figure = Figure(figsize=(5.2 * len(panels), 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, (key, log)) in zip(axes, panels.items(), strict=True):
        for i, (label, members) in enumerate(by_group.items()):
            profile = mean_profile(members, key)
            color = TENSORBOARD_PALETTE[i % len(TENSORBOARD_PALETTE)]
            style = "-" if i < len(TENSORBOARD_PALETTE) else "--"
            ax.plot(range(1, len(profile) + 1), profile, style, color=color, marker=".",
                    label=f"{label} (n={len(members)})")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("layer (input -> output)")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def sweep_figures(sweep_dir: Path) -> dict[str, Figure]:
    """The landing page's depth images of a sweep (none without depth numbers): the gradient
    profile and the representation rank at step 0 and at the end of training."""
    runs = load_runs([sweep_dir])
    if not runs:
        return {}
    return {
        "comparison/gradient_profile": profile_figure(runs, {
            "||dL/dW_l|| at step 0": ("grad_norm_init", True),
            "||dL/dW_l|| at the end": ("grad_norm_end", True),
        }, title="Gradient norm per layer (mean over seeds)"),
        "comparison/rank": profile_figure(runs, {
            "mean cosine between samples, step 0": ("cosine_init", False),
            "stable rank, step 0": ("stable_rank_init", True),
        }, title="Representation rank per layer (mean over seeds)"),
    }
