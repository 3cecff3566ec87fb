"""`python scripts/report.py <sweep dir>`: report.csv, a markdown table on stdout, report_* figures.

    python scripts/report.py outputs/multirun/<date>/<time> --format png,pdf,svg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from normlab.results.plotstyle import FORMATS, parse_formats
from normlab.results.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":", 1)[1].splitlines()[0].strip())
    parser.add_argument("sweep_dir", type=Path, help="a Hydra sweep dir (one subdir per job)")
    parser.add_argument("--out", type=Path, help="where to write the files (default: sweep_dir)")
    parser.add_argument("--format", default="png",
                        help=f"comma list of figure formats among {','.join(FORMATS)} "
                             "(default: png, at 200 dpi)")
    args = parser.parse_args(argv)
    try:
        formats = parse_formats(args.format)
    except ValueError as error:
        parser.error(f"--{error}")
    try:
        report = write_report(args.sweep_dir, args.out, formats)
    except (FileNotFoundError, ValueError) as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    for line in report.skipped:
        print(f"report: {line}", file=sys.stderr)
    print(report.markdown)
    print("wrote " + ", ".join(str(f) for f in report.files), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
