"""Config checks (`validate`, `preflight`, `resolvers`; their error in `errors`), and where the
Hydra configs live: from a checkout (editable install) or from an installed wheel."""

from __future__ import annotations

from pathlib import Path

from normlab.config.errors import ConfigError, one_line

__all__ = ["CONFIG_DIR", "ConfigError", "one_line"]

# The wheel carries conf/ at normlab/conf (pyproject force-include); a checkout has it at the
# root, three folders above this file (src/normlab/config/__init__.py).
_PACKAGED = Path(__file__).parents[1] / "conf"
_CHECKOUT = Path(__file__).resolve().parents[3] / "conf"

CONFIG_DIR: Path = _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT
