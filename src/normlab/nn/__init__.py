"""normlab's own layers: a hand-written BatchNorm, the BN variants built on it (Batch Renorm,
Ghost BN, noisy BN), an image RMSNorm, and BatchNorm folding for inference.

Needs torch only (no Lightning, no Hydra), so it can be imported anywhere.
"""

from normlab.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d
from normlab.nn.fold import fold_batchnorm
from normlab.nn.ghost_bn import GhostBatchNorm1d, GhostBatchNorm2d
from normlab.nn.noisy_bn import NoisyBatchNorm1d, NoisyBatchNorm2d
from normlab.nn.rms import RMSNorm2d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "RMSNorm2d",
    "fold_batchnorm",
]
