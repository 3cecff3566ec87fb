"""Draw Santurkar et al. 2018's figures from santurkar_* sweeps, and print their numbers.

    python train.py -m experiment=santurkar_landscape seed=0,1,2
    python scripts/santurkar.py outputs/multirun/<date>/<time> [more sweeps] --out santurkar.png

One row per learning rate: (a) validation accuracy, (b) gradient ICS ||G - G'|| of a layer
(Fig. 3), (c) the loss band min..max of L(x - eta g) over the probed step sizes, (d) gradient
predictiveness max ||grad L(x) - grad L(x - eta g)||, (e) effective beta-smoothness (Fig. 4);
then one panel per norm with the p15/p50/p85 of a layer's nonlinearity input (Fig. 2, noisy BN).
Mean over seeds thick, each seed thin. The table compares each norm with `none` over the first
part of training (`--early`, a fraction of the steps), where the paper sees BN's largest effect.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from normlab.results.plotstyle import PNG_DPI, group_colors, start_time, tensorboard_order
from normlab.results.runs import (
    Series,
    loss_band,
    mean_curve,
    read_choices,
    read_scalars,
)

# One colour per norm, the one TensorBoard gives its first run (normlab.results.plotstyle);
# set by draw().
NORM_COLORS: dict[str, str] = {}
PERCENTILE_STYLES = {"p85": "--", "p50": "-", "p15": "--"}


@dataclass(frozen=True)
class Run:
    directory: Path
    norm: str
    lr: float
    seed: int
    status: str
    series: Series


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """Every run dir (one with `.hydra/config.yaml`) under `paths`, with its scalars."""
    import json

    from omegaconf import OmegaConf

    runs = []
    for path in paths:
        for config in sorted(path.glob("**/.hydra/config.yaml")):
            directory = config.parent.parent
            cfg = OmegaConf.load(config)
            metrics = directory / "metrics.json"
            status = json.loads(metrics.read_text()).get("status", "?") if metrics.exists() else "?"
            runs.append(
                Run(
                    directory,
                    read_choices(directory).get("norm", "none"),
                    float(cfg.lr),
                    int(cfg.seed),
                    status,
                    read_scalars(directory),
                )
            )
    return runs


def early_mean(curve: dict[int, float], last_step: int) -> float:
    """Mean of a curve over the steps <= last_step (nan when it has none)."""
    values = [v for s, v in curve.items() if s <= last_step and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {std:.2g}"


def early_table(runs: Sequence[Run], early: float) -> str:
    """Markdown: per lr and norm, early-training means and their ratio to `none` (paired seeds)."""
    measures = {
        "grad_pred_max": lambda r: r.series.get("landscape/grad_pred_max", {}),
        "loss band": lambda r: loss_band(r.series),
        "beta_smooth": lambda r: r.series.get("landscape/beta_smooth", {}),
    }
    measures = {name: pick for name, pick in measures.items() if any(pick(r) for r in runs)}
    steps = [s for r in runs for s in r.series.get("landscape/grad_pred_max", {})]
    steps = steps or [s for r in runs for s in r.series.get("val/acc", {})]
    last = max(steps, default=0) * early
    lines = [
        f"First {early:.0%} of training (steps <= {last:.0f}); mean ± std over seeds; ratio = "
        f"norm / none, same seed.",
        "",
        "| " + " | ".join(["lr", "norm", "seeds", "status", "val/acc",
                           *(f"{m} | ratio" for m in measures)]) + " |",
        "|---|---|---|---|---|" + "---|---|" * len(measures),
    ]
    for lr in sorted({r.lr for r in runs}):
        by_norm: dict[str, dict[int, Run]] = {}
        for run in runs:
            if run.lr == lr:
                by_norm.setdefault(run.norm, {})[run.seed] = run
        reference = by_norm.get("none", {})
        for norm, seeds in sorted(by_norm.items(), key=lambda kv: kv[0] != "none"):
            statuses = ",".join(sorted({r.status for r in seeds.values()}))
            accuracy = [_last(r.series.get("val/acc", {})) for r in seeds.values()]
            cells = [f"{lr:g}", norm, str(len(seeds)), statuses, mean_std(accuracy)]
            for pick in measures.values():
                values = {s: early_mean(pick(r), last) for s, r in seeds.items()}
                ratios = [
                    values[s] / early_mean(pick(reference[s]), last)
                    for s in values
                    if s in reference and norm != "none"
                ]
                cells += [mean_std(list(values.values())), mean_std(ratios) if ratios else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _last(curve: dict[int, float]) -> float:
    return curve[max(curve)] if curve else math.nan


def layer_with(runs: Sequence[Run], stat: str, wanted: str | None) -> str | None:
    """`wanted`, or the deepest hidden layer that has ics/<layer>/<stat>."""
    layers = {t.split("/")[1] for r in runs for t in r.series if t.startswith("ics/")}
    layers = {name for name in layers if any(f"ics/{name}/{stat}" in r.series for r in runs)}
    if wanted is not None:
        return wanted if wanted in layers else None
    numbered = [name for name in layers if name.removeprefix("layer").isdigit()]
    return max(numbered, key=lambda name: int(name.removeprefix("layer")), default=None)


def draw(runs: Sequence[Run], out: Path, layer: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r.lr for r in runs})
    norms = sorted({r.norm for r in runs}, key=lambda n: (n != "none", n))
    started = ((r.norm, start_time(r.directory)) for r in runs)
    NORM_COLORS.update(group_colors(tensorboard_order(started)))
    shift_layer = layer_with(runs, "grad_shift", layer)
    band_layer = layer_with(runs, "p50", layer)
    landscape = any("landscape/grad_pred_max" in r.series for r in runs)
    columns = max(5 if landscape else 2, len(norms))
    fig, axes = plt.subplots(
        len(lrs) + 1, columns, figsize=(4.2 * columns, 3.3 * (len(lrs) + 1)), squeeze=False
    )
    for row, lr in zip(axes, lrs, strict=False):
        at_lr = [r for r in runs if r.lr == lr]
        _curves(row[0], at_lr, norms, lambda r: r.series.get("val/acc", {}))
        row[0].set(title=f"(a) lr={lr:g}: validation accuracy", ylabel="val/acc")
        tag = f"ics/{shift_layer}/grad_shift"
        _curves(row[1], at_lr, norms, lambda r, tag=tag: r.series.get(tag, {}), log=True)
        row[1].set(title=f"(b) gradient ICS of {shift_layer}", ylabel="||G - G'||")
        if not landscape:
            for ax in row[2:]:
                ax.axis("off")
            continue
        _band(row[2], at_lr, norms)
        row[2].set(title="(c) loss along the gradient", ylabel="min..max of L(x - eta g)")
        _curves(row[3], at_lr, norms, lambda r: r.series.get("landscape/grad_pred_max", {}),
                log=True)
        row[3].set(title="(d) gradient predictiveness", ylabel="max ||dL(x) - dL(x - eta g)||")
        _curves(row[4], at_lr, norms, lambda r: r.series.get("landscape/beta_smooth", {}),
                log=True)
        row[4].set(title="(e) effective beta-smoothness", ylabel="max ||dL - dL'|| / ||eta g||")
    bottom = axes[-1]
    for ax in bottom[1 : len(norms)]:
        ax.sharey(bottom[0])  # one scale: the spread with and without a norm compares by eye
    for ax, norm in zip(bottom, norms, strict=False):
        _percentiles(ax, [r for r in runs if r.norm == norm and r.lr == lrs[0]], band_layer,
                     NORM_COLORS.get(norm))
        ax.set_ylabel("p15 / p50 / p85 on the probe batch")
        ax.set(title=f"(f) {norm}, lr={lrs[0]:g}: {band_layer} preactivation")
    for ax in bottom[len(norms):]:
        ax.axis("off")
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=PNG_DPI)
    plt.close(fig)
    return out


def _curves(ax, runs, norms, pick, log: bool = False) -> None:
    for norm in norms:
        group = [r for r in runs if r.norm == norm]
        color = NORM_COLORS.get(norm)
        for run in group:
            points = sorted(pick(run).items())
            ax.plot([s for s, _ in points], [v for _, v in points], color=color, lw=0.6, alpha=0.35)
        steps, values = mean_curve([pick(r) for r in group])
        if steps:
            ax.plot(steps, values, color=color, lw=2, label=f"{norm} (n={len(group)})")
    if log and ax.lines:
        ax.set_yscale("log")
    if ax.lines:
        ax.legend(fontsize=8)


def _band(ax, runs, norms) -> None:
    for norm in norms:
        group = [r for r in runs if r.norm == norm]
        color = NORM_COLORS.get(norm)
        steps, lows = mean_curve([r.series.get("landscape/loss_min", {}) for r in group])
        _, highs = mean_curve([r.series.get("landscape/loss_max", {}) for r in group])
        if steps:
            ax.fill_between(steps, lows, highs, color=color, alpha=0.35, label=norm)
        for run in group:
            for tag in ("landscape/loss_min", "landscape/loss_max"):
                points = sorted(run.series.get(tag, {}).items())
                ax.plot([s for s, _ in points], [v for _, v in points], color=color, lw=0.5,
                        alpha=0.35)
    if ax.collections:
        ax.set_yscale("log")
        ax.legend(fontsize=8)


def _percentiles(ax, runs, layer, color) -> None:
    """p50 solid, p15/p85 dashed, all in the norm's colour; each seed thin, the mean thick."""
    for name, style in PERCENTILE_STYLES.items():
        tag = f"ics/{layer}/{name}"
        for run in runs:
            points = sorted(run.series.get(tag, {}).items())
            ax.plot([s for s, _ in points], [v for _, v in points], color=color, ls=style, lw=0.6,
                    alpha=0.3)
        steps, values = mean_curve([r.series.get(tag, {}) for r in runs])
        if steps:
            ax.plot(steps, values, color=color, ls=style, lw=2, label=name)
    if ax.lines:
        ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep dir(s) or run dir(s)")
    parser.add_argument("--out", type=Path, default=Path("santurkar.png"), help="PNG to write")
    parser.add_argument("--layer", help="layer for (b) and (f) (default: the deepest)")
    parser.add_argument("--early", type=float, default=1 / 3,
                        help="the table's first part of training, as a fraction of the steps")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such directory: {', '.join(missing)}")
    runs = load_runs(args.paths)
    if not runs:
        print("santurkar: error: no runs (no .hydra/config.yaml) under the given paths",
              file=sys.stderr)
        return 1
    print(early_table(runs, args.early))
    print(draw(runs, args.out, args.layer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
