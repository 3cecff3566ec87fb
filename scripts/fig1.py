"""Draw the BN paper's Fig. 1 from a `bn_paper_fig1` sweep (or from run dirs).

    python train.py -m experiment=bn_paper_fig1 norm=none,bn seed=0,1,2
    python scripts/fig1.py outputs/multirun/<date>/<time> --out fig1.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from normlab.figures import draw_fig1, load_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep dir(s) or run dir(s)")
    parser.add_argument("--out", type=Path, default=Path("fig1.png"), help="PNG to write")
    parser.add_argument("--layer", help="layer to show (default: the last hidden layer)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such directory: {', '.join(missing)}")
    try:
        out = draw_fig1(load_runs(args.paths), args.out, args.layer)
    except ValueError as error:
        print(f"fig1: error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
