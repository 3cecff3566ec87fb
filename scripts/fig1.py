"""Draw the BN paper's Fig. 1 from a `bn_paper_fig1` sweep (or from run dirs).

    python train.py -m experiment=bn_paper_fig1 norm=none,bn seed=0,1,2
    python scripts/fig1.py outputs/multirun/<date>/<time> --out fig1.png --format png,pdf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from normlab.results.figures import draw_fig1, load_runs
from normlab.results.plotstyle import FORMATS, parse_formats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep dir(s) or run dir(s)")
    parser.add_argument("--out", type=Path, default=Path("fig1.png"),
                        help="file to write; its suffix is replaced per --format")
    parser.add_argument("--format", default="png",
                        help=f"comma list among {','.join(FORMATS)} (default: png, at 200 dpi)")
    parser.add_argument("--layer", help="layer to show (default: the last hidden layer)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such directory: {', '.join(missing)}")
    try:
        formats = parse_formats(args.format)
    except ValueError as error:
        parser.error(f"--{error}")
    try:
        draw_fig1(load_runs(args.paths), args.out, args.layer, formats)
    except ValueError as error:
        print(f"fig1: error: {error}", file=sys.stderr)
        return 1
    for fmt in formats:
        print(args.out.with_suffix(f".{fmt}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
