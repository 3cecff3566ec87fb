"""`python scripts/report.py <sweep dir>`: report.csv, a markdown table on stdout, report_*.png."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from normlab.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("sweep_dir", type=Path, help="a Hydra sweep dir (one subdir per job)")
    parser.add_argument("--out", type=Path, help="where to write the files (default: sweep_dir)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    print(report.markdown)
    print("wrote " + ", ".join(str(f) for f in report.files), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
