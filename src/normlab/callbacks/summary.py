"""Per-layer summary numbers of a run's ICS curves, for `metrics.json` under `"ics"`."""

from __future__ import annotations

from statistics import fmean
from typing import Any

from normlab.results.runs import Series, layers_with


def activation_summary(series: Series) -> dict[str, dict[str, float]]:
    """How far the median and the p15-p85 spread of each layer's input moved over training."""
    summary = {}
    for layer in layers_with(series, "p50"):
        p15, p50, p85 = (series.get(f"ics/{layer}/{k}", {}) for k in ("p15", "p50", "p85"))
        steps = sorted(set(p15) & set(p50) & set(p85))
        if not steps:
            continue
        first, last = steps[0], steps[-1]
        summary[layer] = {
            "p50_start": p50[first],
            "p50_end": p50[last],
            "p50_travel": abs(p50[last] - p50[first]),
            "p50_max_shift": max(abs(p50[s] - p50[first]) for s in steps),
            "spread_start": p85[first] - p15[first],
            "spread_end": p85[last] - p15[last],
        }
    return summary


def grad_shift_summary(series: Series) -> dict[str, dict[str, float]]:
    """Mean ||G - G'|| (and mean cosine) of each layer over the measured steps."""
    summary: dict[str, dict[str, float]] = {}
    for layer in layers_with(series, "grad_shift"):
        numbers = {"grad_shift_mean": fmean(series[f"ics/{layer}/grad_shift"].values())}
        cosines = series.get(f"ics/{layer}/grad_cos")
        if cosines:
            numbers["grad_cos_mean"] = fmean(cosines.values())
        summary[layer] = numbers
    return summary


def merge_summaries(callbacks: list[Any]) -> dict[str, dict[str, float]]:
    """Per-layer numbers of every callback that has an `ics_summary()`, merged layer by layer."""
    ics: dict[str, dict[str, float]] = {}
    for callback in callbacks:
        for layer, numbers in getattr(callback, "ics_summary", dict)().items():
            ics.setdefault(layer, {}).update(numbers)
    return ics


def merge_depth(callbacks: list[Any]) -> dict[str, dict[str, float]]:
    """Per-layer numbers of every callback that has a `depth_summary()` (the depth probe's
    gradient profile and rank at step 0 and at the end), for `metrics.json` under `"depth"`."""
    depth: dict[str, dict[str, float]] = {}
    for callback in callbacks:
        for layer, numbers in getattr(callback, "depth_summary", dict)().items():
            depth.setdefault(layer, {}).update(numbers)
    return depth
