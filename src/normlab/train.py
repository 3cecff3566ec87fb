"""Entry point: compose the config with Hydra, train, test, and write `metrics.json`.

`train(cfg)` is a plain function (tests call it with a composed config); `main()` is the
command line (`python train.py ...`). A run that raises is recorded as `status: failed` in its
`metrics.json`; inside a sweep the other jobs go on and the sweep exits non-zero at the end
(see `normlab.sweep.SweepSummary`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from normlab.atomic import atomic_write_bytes
from normlab.config import CONFIG_DIR
from normlab.resolvers import register_resolvers
from normlab.signals import RunInterrupted, interruption_recorded, is_launcher_process
from normlab.validate import ConfigError, validate

log = logging.getLogger("normlab")
register_resolvers()  # before Hydra composes; joblib workers import this module too

# Hydra 1.3 warns once per process that our same-named launcher overrides (conf/hydra/launcher/)
# are "validated against ConfigStore schema"; that is intended. Module level, so joblib's worker
# processes, which import this module, are quiet too.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema"
)

FINAL_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit then test the configured model; return (and write) the final metrics."""
    output_dir = Path(cfg.paths.output_dir)
    result: dict[str, Any] = {"status": "failed", "overrides": _task_overrides()}
    started = time.perf_counter()
    try:
        with interruption_recorded(result):  # SIGTERM/SIGINT: status interrupted, RunInterrupted
            validate(cfg)
            result.update(_fit_and_test(cfg, output_dir))
            result["status"] = "diverged" if "diverged_at_step" in result else "ok"
    except Exception as error:
        result["error"] = _one_line(error)
        raise
    finally:
        result["train_seconds"] = round(time.perf_counter() - started, 3)
        if _is_global_zero():
            write_metrics(output_dir, result)
    return result


def build_module(cfg: DictConfig, datamodule: Any) -> Any:
    """The configured backbone, sized by the data, inside the ClassifierModule."""
    from hydra.utils import instantiate

    from normlab.models.module import ClassifierModule

    backbone = instantiate(
        cfg.model,
        input_shape=datamodule.input_shape,
        num_classes=datamodule.num_classes,
        _convert_="all",
    )
    return ClassifierModule(backbone, num_classes=datamodule.num_classes, lr=cfg.lr, seed=cfg.seed)


def build_trainer(cfg: DictConfig, extra_callbacks: list[Any] = ()) -> tuple[Any, list[Any]]:
    """(Trainer, the configured callbacks) with the configured loggers; groups may be empty."""
    from hydra.utils import instantiate

    def group(key: str) -> list[Any]:
        return [instantiate(c) for c in (cfg.get(key) or {}).values() if c is not None]

    callbacks = group("callbacks")
    trainer = instantiate(
        cfg.trainer, callbacks=[*callbacks, *extra_callbacks], logger=group("logger")
    )
    return trainer, callbacks


def _fit_and_test(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    import lightning.pytorch as pl  # heavy imports only once a run really starts
    from hydra.utils import instantiate

    _quiet_lightning()
    _set_threads(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.load()  # missing files fail here, before a model or trainer exists
    module = build_module(cfg, datamodule)
    trainer, callbacks = build_trainer(cfg, run_safety_callbacks(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    fit_metrics = _scalars(trainer.callback_metrics)
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {**fit_metrics, **_scalars(trainer.callback_metrics)}
    summary: dict[str, Any] = {k: metrics[k] for k in FINAL_METRICS if k in metrics}
    summary["epochs"], summary["steps"] = _progress(trainer)
    if "diverged_at_step" in metrics:  # the module stopped on a non-finite loss
        summary["diverged_at_step"] = int(metrics["diverged_at_step"])
    summary["ics"] = _ics_summary(callbacks)
    return summary


def run_safety_callbacks(cfg: DictConfig) -> list[Any]:
    """Save-and-stop on SIGTERM/SIGINT; the composed config inside every checkpoint."""
    from normlab.checkpoints import StopOnSignal, StoreConfig

    return [StopOnSignal(), StoreConfig(cfg)]


def _ics_summary(callbacks: list[Any]) -> dict[str, dict[str, float]]:
    """Per-layer ICS numbers of every callback that has them, merged layer by layer."""
    ics: dict[str, dict[str, float]] = {}
    for callback in callbacks:
        for layer, numbers in getattr(callback, "ics_summary", dict)().items():
            ics.setdefault(layer, {}).update(numbers)
    return ics


def _quiet_lightning() -> None:
    """One line per message: `lightning` adds its own console handler at import, and Hydra's
    root handler prints the same records again; keep Hydra's (it also writes the job log)."""
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _progress(trainer: Any) -> tuple[int, int]:
    """(epochs, optimizer steps) trained.

    Under spawned DDP (trainer=ddp_cpu) training happens in child processes and this process's
    loop counters stay at 0; Lightning hands back the path of rank 0's checkpoint, which has them.
    """
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if trainer.global_step == 0 and checkpoint:
        import torch

        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        return saved["epoch"] + 1, saved["global_step"]
    return trainer.current_epoch, trainer.global_step


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _set_threads(cfg: DictConfig) -> None:
    """Give each process its share of the cores: N processes x 2 threads on 2 cores crawl."""
    import torch

    threads = cfg.get("torch_threads")
    if threads is None:
        processes = _parallel_jobs() * _processes_per_job(cfg)
        if processes == 1:
            return
        threads = max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by spawned DDP processes


def _processes_per_job(cfg: DictConfig) -> int:
    devices = cfg.trainer.get("devices", 1)
    on_cpu = cfg.trainer.get("accelerator") == "cpu"
    return devices if on_cpu and isinstance(devices, int) and devices > 1 else 1


def _parallel_jobs() -> int:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 1
    n_jobs = HydraConfig.get().launcher.get("n_jobs") or 1
    return (os.cpu_count() or 1) if n_jobs < 0 else int(n_jobs)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


def _one_line(error: BaseException) -> str:
    # Hydra wraps errors raised while instantiating (e.g. a bad model option): report the cause.
    while type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    if isinstance(error, ConfigError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def write_metrics(output_dir: Path, metrics: dict[str, Any]) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    text = json.dumps(_finite_or_null(metrics), indent=2, default=float) + "\n"
    return atomic_write_bytes(path, text.encode())


def _finite_or_null(value: Any) -> Any:
    """NaN/inf -> null: strict JSON readers reject bare NaN (a diverged loss has one)."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        result = train(cfg)
    except RunInterrupted:
        if is_launcher_process():
            raise  # normlab.cli writes the sweep summary and exits 130/143
        return float("nan")  # a joblib worker: the launcher process stops the sweep
    except Exception as error:
        message = _one_line(error)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if _is_multirun():  # recorded in metrics.json; the sweep goes on and fails at its end
            log.error(message)
            return float("nan")  # a failed trial for sweepers that optimise the return value
        print(f"normlab: error: {message}", file=sys.stderr)
        sys.exit(1)
    log.info("%s", OmegaConf.to_yaml({k: v for k, v in result.items() if k != "ics"}))
    return result.get("val/acc")


def main() -> None:
    """Command line entry point (`python train.py`, `normlab-train`)."""
    from normlab.cli import run_command_line

    run_command_line(_hydra_main, sys.argv[1:])


if __name__ == "__main__":
    main()
