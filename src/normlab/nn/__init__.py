"""normlab's own layers: a hand-written BatchNorm and BatchNorm folding for inference.

Needs torch only (no Lightning, no Hydra), so it can be imported anywhere.
"""

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d
from normlab.nn.fold import fold_batchnorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "fold_batchnorm"]
