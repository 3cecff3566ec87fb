"""Wu & He 2018 (GroupNorm), Fig. 1 from groupnorm_batch_size sweeps: error against the batch
size, one line per norm (mean +- std over seeds, log x), and the table behind it.

    python train.py -m experiment=groupnorm_batch_size
    python scripts/groupnorm_batch_size.py outputs/multirun/<date>/<time> [more sweeps] \\
        --out docs/groupnorm_batch_size_digits.png

A norm is named by its `norm` and, when not plain, its `weights` choice (`gn+standardized` is
BiT's GN+WS). The table (markdown, to stdout) has validation and test error in % per norm and
batch size, mean +- std over the seeds, and how many seeds each cell holds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from normlab.results.plotstyle import group_colors, save_figure
from normlab.results.runs import read_job, run_dirs

ORDER = ("bn", "gn", "gn+standardized", "ln", "in", "frn")
Cells = dict[str, dict[int, dict[str, list[float]]]]


def name_of(hparams: dict) -> str:
    weights = hparams.get("weights", "plain")
    return hparams["norm"] if weights in (None, "plain") else f"{hparams['norm']}+{weights}"


def collect(paths: Sequence[Path]) -> tuple[Cells, list[str]]:
    """norm -> batch size -> {"val": [errors], "test": [errors]} over seeds; and the problems."""
    cells: Cells = {}
    problems = []
    for job in run_dirs(paths):
        record = read_job(job)
        if record.get("status") not in ("ok", "diverged") or "hparams" not in record:
            problems.append(f"{job}: {record.get('status')} {record.get('error', '')}".strip())
            continue
        h = record["hparams"]
        cell = cells.setdefault(name_of(h), {}).setdefault(int(h["batch_size"]), {})
        for split in ("val", "test"):
            acc = record.get(f"{split}/acc")
            cell.setdefault(split, []).append(100 * (1 - acc) if acc is not None else 100.0)
    return cells, problems


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ordered(cells: Cells) -> list[str]:
    return sorted(cells, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def table(cells: Cells) -> str:
    sizes = sorted({b for per in cells.values() for b in per})
    lines = ["| norm | " + " | ".join(f"B={b}" for b in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for split in ("val", "test"):
        for norm in ordered(cells):
            row = []
            for b in sizes:
                values = cells[norm].get(b, {}).get(split, [])
                if not values:
                    row.append("")
                    continue
                m, s = mean_std(values)
                row.append(f"{m:.1f} ± {s:.1f}" + (f" (n={len(values)})" if len(values) != 3
                                                    else ""))
            lines.append(f"| {norm} ({split} error %) | " + " | ".join(row) + " |")
    return "\n".join(lines)


def draw(cells: Cells, out: Path, split: str = "val") -> list[Path]:
    import matplotlib.pyplot as plt

    names = ordered(cells)
    colors = group_colors(names)
    fig, ax = plt.subplots(figsize=(6, 4))
    for norm in names:
        sizes = sorted(b for b, c in cells[norm].items() if c.get(split))
        stats = [mean_std(cells[norm][b][split]) for b in sizes]
        means = [m for m, _ in stats]
        stds = [s for _, s in stats]
        ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=norm,
                    color=colors[norm])
    ax.set_xscale("log", base=2)
    all_sizes = sorted({b for per in cells.values() for b in per})
    ax.set_xticks(all_sizes, [str(b) for b in all_sizes])
    ax.set_xlabel("batch size per device (lr scaled linearly with it)")
    ax.set_ylabel(f"{'validation' if split == 'val' else 'test'} error (%)")
    n_seeds = max(len(c.get(split, [])) for per in cells.values() for c in per.values())
    ax.set_title(f"Error vs batch size, VGG-small on digits (mean ± std, up to {n_seeds} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written = save_figure(fig, out)
    plt.close(fig)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("groupnorm_batch_size.png"))
    parser.add_argument("--split", choices=("val", "test"), default="val")
    args = parser.parse_args(argv)
    cells, problems = collect(args.sweeps)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    if not cells:
        print("no finished runs under " + ", ".join(map(str, args.sweeps)), file=sys.stderr)
        return 1
    print(table(cells))
    for path in draw(cells, args.out, args.split):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
