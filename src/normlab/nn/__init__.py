"""normlab's norm layers and what the lab reads from them.

Every norm here is built as ``Class(num_features, **options)`` and takes (N, C) features and
(N, C, H, W) images (``conf/norm/*.yaml`` names them by ``_target_``): thin classes over torch's
BatchNorm, LayerNorm, GroupNorm and RMSNorm, our hand-written BatchNorm and the variants built on
it (Batch Renorm, Ghost BN, noisy BN). ``traits`` says what the instruments need to know about any
norm, a user's own included; ``fold`` merges BN into the neighbouring Linear/Conv for inference.
The rank-specific ``BatchNorm1d``/``BatchNorm2d`` (and variants) mirror torch's classes.

Needs torch only (no Lightning, no Hydra), so it can be imported anywhere.
"""

from normlab.nn.batch_renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d
from normlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d
from normlab.nn.fold import FoldWarning, fold_batchnorm
from normlab.nn.ghost_bn import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d
from normlab.nn.noisy_bn import NoisyBatchNorm, NoisyBatchNorm1d, NoisyBatchNorm2d
from normlab.nn.rms import RMSNorm, RMSNorm2d
from normlab.nn.torch_norms import GroupNorm, LayerNorm, TorchBatchNorm
from normlab.nn.traits import batch_dependent, has_running_stats

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "FoldWarning",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GroupNorm",
    "LayerNorm",
    "NoisyBatchNorm",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "RMSNorm",
    "RMSNorm2d",
    "TorchBatchNorm",
    "batch_dependent",
    "fold_batchnorm",
    "has_running_stats",
]
