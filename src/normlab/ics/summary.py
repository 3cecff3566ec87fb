"""Per-layer summary numbers of a run's ICS curves, for `metrics.json` under `"ics"`."""

from __future__ import annotations

import re
from statistics import fmean

from normlab.ics.events import Series


def layers_with(series: Series, stat: str) -> list[str]:
    """Layers that have `ics/<layer>/<stat>`, in natural order (layer2 before layer10)."""
    found = {tag.split("/")[1] for tag in series if re.fullmatch(rf"ics/[^/]+/{stat}", tag)}
    return sorted(found, key=_natural_key)


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
