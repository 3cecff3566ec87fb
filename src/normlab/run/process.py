"""Process tuning for one run: threads per process, quiet logs, no needless CUDA probes.

None of this changes results; it keeps a run fast and its console readable, and lives here so
that `train.py` reads as the orchestration it is.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from omegaconf import DictConfig


def quiet_hydra_launcher_warning() -> None:
    """Hydra 1.3 warns once per process that our same-named launcher overrides
    (conf/hydra/launcher/) are "validated against ConfigStore schema"; that is intended."""
    warnings.filterwarnings(
        "ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema"
    )


def quiet_lightning() -> None:
    """One line per message: `lightning` adds its own console handler at import, and Hydra's
    root handler prints the same records again; keep Hydra's (it also writes the job log)."""
    if logging.getLogger().handlers:
        # imported before the root had a handler (in a sweep worker's forkserver), lightning
        # also stopped its records from reaching the root's: the job's train.log would miss them
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lightning_logger = logging.getLogger(name)
            for handler in list(lightning_logger.handlers):
                if type(handler) is logging.StreamHandler:
                    lightning_logger.removeHandler(handler)
            lightning_logger.propagate = True
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # log_every_n_steps counts optimizer steps here (train/lr); Lightning compares it with the
    # number of Lightning batches, K times smaller, and would warn for nothing.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller")


def without_progress_bar_off_tty(callbacks: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """(callbacks, Trainer arguments) with no live progress bar when stdout is not a terminal
    (a log file, a pipe, a batch job): redrawn lines are noise there, and Rich's live display
    costs every job of a sweep its set-up, refreshes and teardown. The metrics are logged anyway."""
    if sys.stdout.isatty():
        return callbacks, {}
    from lightning.pytorch.callbacks import ProgressBar

    kept = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return kept, {"enable_progress_bar": False}


def skip_nvml_probe_on_cpu(cfg: DictConfig) -> None:
    """Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 so that CUDA probes don't poison fork().
    On a CUDA build without a GPU, torch then reloads NVML at every probe, and Adam probes at
    every step: more than a whole step of the lecture's MLP. A CPU run never needs CUDA."""
    if cfg.trainer.get("accelerator") == "cpu":
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)


def set_threads(cfg: DictConfig) -> None:
    """Give each process its share of the cores: N processes x 2 threads on 2 cores crawl."""
    import torch

    threads = cfg.get("torch_threads")
    if threads is None:
        processes = parallel_jobs() * processes_per_job(cfg)
        if processes == 1:
            return
        threads = max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by spawned DDP processes


def processes_per_job(cfg: DictConfig) -> int:
    devices = cfg.trainer.get("devices", 1)
    on_cpu = cfg.trainer.get("accelerator") == "cpu"
    return devices if on_cpu and isinstance(devices, int) and devices > 1 else 1


def parallel_jobs() -> int:
    """How many jobs of this sweep run at once on this machine (joblib's n_jobs, else 1)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 1
    n_jobs: Any = HydraConfig.get().launcher.get("n_jobs") or 1
    return (os.cpu_count() or 1) if n_jobs < 0 else int(n_jobs)


def is_global_zero() -> bool:
    """Rank 0 of a distributed run (RANK, SLURM_PROCID, LOCAL_RANK, ... as Lightning reads them)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
