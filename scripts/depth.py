"""Figures and README tables of the depth experiments, from their sweep directories.

    python scripts/depth.py vanishing <sweep dir> --out docs/depth_vanishing.png
    python scripts/depth.py explosion <mlp sweep> <resnet sweep> --out docs/depth_explosion.png
    python scripts/depth.py rank <sweep dir> --out docs/depth_rank.png
    python scripts/depth.py resnet <sweep dir> --out docs/depth_resnet.png

Each prints a markdown table (mean ± std over seeds) and writes the figure. Numbers come from the
jobs' metrics.json ("depth": per layer, step 0 `_init` and end of training `_end`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from normlab.results.depth import fmt, groups, layer_values, load_runs, mean_profile, mean_std
from normlab.results.plotstyle import TENSORBOARD_PALETTE as PALETTE

Runs = list[dict[str, Any]]


def _p(run: dict[str, Any], key: str, default: str = "") -> str:
    return str(run["params"].get(key, default))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def _ratio(run: dict[str, Any], key: str) -> float:
    values = layer_values(run, key)
    return values[0] / values[-1] if values and values[-1] > 0 else math.nan


# ---------------------------------------------------------------- vanishing_gradients


def vanishing(runs: Runs) -> tuple[Figure, str]:
    keys = ["activation", "init", "norm"]
    by_group = groups(runs, keys)
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    axes = figure.subplots(2, 2, sharey="row")
    inits = sorted({_p(r, "init") for r in runs})
    for row, activation in enumerate(["sigmoid", "relu"]):
        for col, (key, when) in enumerate([("grad_norm_init", "at initialization"),
                                           ("grad_norm_end", "after training")]):
            ax = axes[row, col]
            for _label, members in by_group.items():
                if _p(members[0], "activation") != activation:
                    continue
                init, norm = _p(members[0], "init"), _p(members[0], "norm")
                profile = mean_profile(members, key)
                ax.plot(range(1, len(profile) + 1), profile, "-" if norm == "bn" else "--",
                        marker=".", color=PALETTE[inits.index(init) % len(PALETTE)],
                        label=f"init={init} norm={norm}")
            ax.set_yscale("log")
            ax.set_title(f"{activation}, {when}", fontsize=10)
            ax.set_xlabel("layer (input -> output)")
            ax.grid(alpha=0.3)
        axes[row, 0].set_ylabel("||dL/dW_l|| (geometric mean over seeds)")
    axes[0, 0].legend(fontsize=7)
    figure.suptitle("Depth-20 MLP on digits: gradient norm per layer (dashed: no norm, solid: BN)")
    rows = []
    for _label, members in by_group.items():
        ratio_init = mean_std(_ratio(r, "grad_norm_init") for r in members)
        ratio_end = mean_std(_ratio(r, "grad_norm_end") for r in members)
        acc = mean_std(r["metrics"].get("test/acc") for r in members)
        rows.append([_p(members[0], "activation"), _p(members[0], "init"), _p(members[0], "norm"),
                     fmt(*ratio_init), fmt(*ratio_end), fmt(*acc), str(len(members))])
    table = _table(["activation", "init", "norm", "layer1/layer20 grad, init",
                    "layer1/layer20 grad, end", "test acc", "seeds"], rows)
    return figure, table


# ---------------------------------------------------------------- bn_gradient_explosion


def explosion(runs: Runs) -> tuple[Figure, str]:
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    ax_depth, ax_layers = figure.subplots(1, 2)
    rows = []
    series: dict[str, dict[int, tuple[float, float]]] = {}
    for run in runs:
        model = "resnet" if _p(run, "model") == "resnet" else "mlp"
        label = f"{model} norm={_p(run, 'norm')}"
        depth = int(_p(run, "model.depth", "0"))
        series.setdefault(label, {}).setdefault(depth, [])  # type: ignore[arg-type]
        series[label][depth].append(layer_values(run, "grad_norm_init")[0])  # type: ignore[attr-defined]
    all_depths = sorted({int(_p(r, "model.depth", "0")) for r in runs})
    for i, (label, by_depth) in enumerate(sorted(series.items())):
        depths = sorted(by_depth)
        logs = {d: [math.log(v) for v in by_depth[d] if v > 0] for d in depths}
        means = [math.exp(sum(logs[d]) / len(logs[d])) for d in depths]
        style = "--" if label.startswith("resnet") else "-"
        ax_depth.plot(depths, means, style, marker="o", color=PALETTE[i % len(PALETTE)],
                      label=label)
        rate = _growth_rate(logs)
        cells = [fmt(*mean_std(by_depth[d])) if d in by_depth else "-" for d in all_depths]
        rows.append([label, *cells, f"{rate:.3f}"])
        deepest = [r for r in runs if f"{'resnet' if _p(r, 'model') == 'resnet' else 'mlp'} "
                   f"norm={_p(r, 'norm')}" == label and int(_p(r, "model.depth")) == depths[-1]]
        profile = mean_profile(deepest, "grad_norm_init")
        within = (profile[0] / profile[-1]) ** (1 / (len(profile) - 1)) if len(profile) > 1 else 1
        rows[-1].append(f"{within:.3f}")
        ax_layers.plot(range(1, len(profile) + 1), profile, style, marker=".",
                       color=PALETTE[i % len(PALETTE)], label=f"{label}, depth {depths[-1]}")
    ax_depth.set_yscale("log")
    ax_depth.set_xlabel("depth")
    ax_depth.set_ylabel("||dL/dW_1|| at init (first layer)")
    ax_depth.set_title("first-layer gradient vs depth", fontsize=10)
    ax_layers.set_yscale("log")
    ax_layers.set_xlabel("layer (input -> output)")
    ax_layers.set_title("gradient profile of the deepest nets", fontsize=10)
    for ax in (ax_depth, ax_layers):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle("At initialization, He init, digits (Yang et al. 2019)")
    header = ["network", *(f"depth {d}" for d in all_depths), "growth per layer (across depths)",
              "growth per layer (within the deepest)"]
    table = _table(header, rows)
    return figure, table


def _growth_rate(logs: dict[int, list[float]]) -> float:
    """exp(slope) of the least-squares line through log ||dL/dW_1|| vs depth (all seeds)."""
    points = [(d, v) for d, values in logs.items() for v in values]
    if len({d for d, _ in points}) < 2:
        return math.nan
    mx = sum(d for d, _ in points) / len(points)
    my = sum(v for _, v in points) / len(points)
    slope = sum((d - mx) * (v - my) for d, v in points) / sum((d - mx) ** 2 for d, _ in points)
    return math.exp(slope)


# ---------------------------------------------------------------- rank_collapse


def rank(runs: Runs) -> tuple[Figure, str]:
    by_group = groups(runs, ["activation", "norm"])
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    ax_cos, ax_rank = figure.subplots(1, 2)
    norms = sorted({_p(r, "norm") for r in runs})
    rows = []
    for _label, members in by_group.items():
        activation, norm = _p(members[0], "activation"), _p(members[0], "norm")
        style = "--" if activation == "identity" else "-"
        color = PALETTE[norms.index(norm) % len(PALETTE)]
        name = f"{'linear' if activation == 'identity' else activation} norm={norm}"
        for ax, key in ((ax_cos, "cosine_init"), (ax_rank, "stable_rank_init")):
            profile = mean_profile(members, key)
            ax.plot(range(1, len(profile) + 1), profile, style, color=color, label=name)
        cos = [layer_values(r, "cosine_init") for r in members]
        sr = [layer_values(r, "stable_rank_init") for r in members]
        rows.append([name, *(fmt(*mean_std(c[i] for c in cos)) for i in (0, 9, -1)),
                     *(fmt(*mean_std(s[i] for s in sr)) for i in (0, 9, -1)), str(len(members))])
    ax_cos.set_title("mean cosine similarity between samples", fontsize=10)
    ax_rank.set_title("stable rank ||H||_F^2 / ||H||_2^2", fontsize=10)
    ax_rank.set_yscale("log")
    for ax in (ax_cos, ax_rank):
        ax.set_xlabel("layer (input -> output)")
        ax.grid(alpha=0.3)
    ax_cos.legend(fontsize=7)
    depth = len(layer_values(runs[0], "cosine_init"))
    figure.suptitle(f"Depth-{depth} MLP at initialization, 256 digits (Daneshmand et al. 2020)")
    table = _table(["network", "cosine layer 1", "cosine layer 10", f"cosine layer {depth}",
                    "stable rank layer 1", "stable rank layer 10", f"stable rank layer {depth}",
                    "seeds"], rows)
    return figure, table


# ---------------------------------------------------------------- resnet_norms


def resnet(runs: Runs) -> tuple[Figure, str]:
    by_group = groups(runs, ["norm", "model.skipinit"])
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    ax_acc, ax_grad = figure.subplots(1, 2)
    rows, labels, means, stds = [], [], [], []
    for i, members in enumerate(by_group.values()):
        norm = _p(members[0], "norm")
        skip = _p(members[0], "model.skipinit", "false").lower()
        name = f"{norm}{' + SkipInit' if skip == 'true' else ''}"
        acc = mean_std(r["metrics"].get("test/acc") for r in members)
        loss = mean_std(r["metrics"].get("val/loss") for r in members)
        ratio = mean_std(_ratio(r, "grad_norm_init") for r in members)
        statuses = sorted({r["metrics"]["status"] for r in members})
        rows.append([name, fmt(*acc), fmt(*loss), fmt(*ratio), "/".join(statuses),
                     str(len(members))])
        labels.append(name)
        means.append(acc[0])
        stds.append(acc[1])
        profile = mean_profile(members, "grad_norm_init")
        ax_grad.plot(range(1, len(profile) + 1), profile, "--" if skip == "true" else "-",
                     marker=".", color=PALETTE[(i // 2) % len(PALETTE)], label=name)
    ax_acc.bar(range(len(labels)), means, yerr=stds, color=[PALETTE[(i // 2) % len(PALETTE)]
                                                           for i in range(len(labels))])
    ax_acc.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
    ax_acc.set_ylabel("test accuracy (mean ± std over seeds)")
    ax_acc.set_ylim(max(0.0, min(means) - 0.1) if means else 0, 1.0)
    ax_grad.set_yscale("log")
    ax_grad.set_xlabel("block (stem = 1)")
    ax_grad.set_ylabel("||dL/dW|| at init (first conv of the block)")
    ax_grad.legend(fontsize=7)
    for ax in (ax_acc, ax_grad):
        ax.grid(alpha=0.3)
    figure.suptitle("ResNet-20 on digits: norms and SkipInit")
    table = _table(["norm", "test acc", "val loss", "stem/last-block grad at init", "status",
                    "seeds"], rows)
    return figure, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["vanishing", "explosion", "rank", "resnet"])
    parser.add_argument("sweep_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="figure file (png)")
    args = parser.parse_args(argv)
    runs = load_runs(args.sweep_dirs)
    if not runs:
        print(f"no finished runs with depth numbers under {args.sweep_dirs}", file=sys.stderr)
        return 1
    draw = {"vanishing": vanishing, "explosion": explosion, "rank": rank, "resnet": resnet}
    figure, table = draw[args.experiment](runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(table)
    print(f"\nfigure: {args.out} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
