"""Where the Hydra configs live, from a checkout (editable install) or from an installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).parent / "conf"  # the wheel carries conf/ here (pyproject force-include)
_CHECKOUT = Path(__file__).resolve().parents[2] / "conf"

CONFIG_DIR: Path = _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT
