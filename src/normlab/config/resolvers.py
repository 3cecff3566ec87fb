"""OmegaConf resolvers of normlab, registered at import of `normlab.train` (before Hydra
composes, and in every joblib worker, which imports that module to run a job).

`${run_name:}`: the job's task overrides (`normlab.results.dashboard.run_name`).

`${normlab.linear_lr:BASE,BATCH[,REFERENCE]}`: the linear scaling rule (Goyal et al. 2017),
``BASE * BATCH / REFERENCE`` (REFERENCE 32 by default), e.g.
``lr: ${normlab.linear_lr:0.1,${data.batch_size}}`` so a batch-size sweep scales its lr.

`${normlab.stamp:PATTERN}`: the process's start time formatted with `PATTERN` (strftime), plus
milliseconds and a random suffix: `2026-11-25_21-13-05-123-a3f9`. Two runs or sweeps started in
the same second get different output dirs. The value is fixed per process; Hydra resolves
`hydra.sweep.dir` in the launching process and hands the resolved value (the config's resolver
cache) to every job, so all jobs of a sweep agree on it.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from functools import cache

from omegaconf import OmegaConf


@cache
def _start() -> tuple[datetime, str]:
    return datetime.now(), secrets.token_hex(2)


def stamp(pattern: str) -> str:
    """`pattern` applied to this process's start time, then `-<milliseconds>-<4 hex digits>`."""
    moment, suffix = _start()
    return f"{moment.strftime(pattern)}-{moment.microsecond // 1000:03d}-{suffix}"


def linear_lr(base: float, batch: int, reference: int = 32) -> float:
    """The learning rate `base` scaled linearly with the batch size: `base * batch / reference`."""
    return float(base) * int(batch) / int(reference)


def register_resolvers() -> None:
    """`${normlab.stamp:...}` (conf/hydra/default.yaml) and `${run_name:}` (the TensorBoard run
    name, conf/logger/tensorboard.yaml; see `normlab.results.dashboard.run_name`)."""
    from normlab.results.dashboard import run_name

    if not OmegaConf.has_resolver("normlab.stamp"):
        OmegaConf.register_new_resolver("normlab.stamp", stamp, use_cache=True)
    if not OmegaConf.has_resolver("normlab.linear_lr"):
        OmegaConf.register_new_resolver("normlab.linear_lr", linear_lr)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
