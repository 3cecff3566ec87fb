"""Entry point: compose the config with Hydra, train, test, and write `metrics.json`.

`train(cfg)` is a plain function (tests call it with a composed config); `main()` is the command
line (`python train.py ...`). A run that raises is recorded as `status: failed` in its
`metrics.json`; inside a sweep the other jobs go on and the sweep exits non-zero at the end."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from normlab.callbacks.summary import merge_depth, merge_summaries
from normlab.config import CONFIG_DIR, ConfigError, one_line
from normlab.config.resolvers import register_resolvers
from normlab.config.validate import validate
from normlab.results import dashboard
from normlab.results.checksums import use_native_crc32c
from normlab.results.runs import METRICS, is_multirun, task_overrides, write_metrics
from normlab.run import process, resume
from normlab.run.signals import RunInterrupted, interruption_recorded, keeps_interruption

log = logging.getLogger("normlab")
SUMMARIES = ("ics", "depth")  # per-layer numbers: in metrics.json, not in the log
# Module level: before Hydra composes, and in joblib's workers, which import this module too.
process.quiet_hydra_launcher_warning()
register_resolvers()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit then test the configured model; return (and write) the final metrics.

    `train_seconds` counts fitting and testing only; `setup_seconds` the rest (imports, data,
    model), which the first run of a process pays alone.
    """
    if (kept := resume.continue_job(cfg)) is not None:
        return kept  # a continued sweep's finished job: kept as it is, not retrained
    output_dir = Path(cfg.paths.output_dir)
    result: dict[str, Any] = {"status": "failed", "overrides": task_overrides()}
    clock = {"start": time.perf_counter()}
    try:
        with interruption_recorded(result):  # SIGTERM/SIGINT: status interrupted, RunInterrupted
            validate(cfg)
            result.update(resume.trained_something(_fit_and_test(cfg, clock)))
            result["status"] = "diverged" if "diverged_at_step" in result else "ok"
    except Exception as error:
        result["error"] = one_line(error)
        raise
    finally:
        end = clock.get("trained", time.perf_counter())
        result["train_seconds"] = round(end - clock.get("fit", end), 3)
        result["setup_seconds"] = round(clock.get("fit", end) - clock["start"], 3)
        if process.is_global_zero():
            write_metrics(output_dir, result)
    return result


def build_module(cfg: DictConfig, datamodule: Any) -> Any:
    """The configured backbone, sized by the data, inside the ClassifierModule."""
    from hydra.utils import instantiate

    from normlab.models.from_config import build_backbone
    from normlab.models.module import ClassifierModule

    backbone = build_backbone(cfg, datamodule.input_shape, datamodule.num_classes)
    return ClassifierModule(
        backbone,
        num_classes=datamodule.num_classes,
        optimizer=instantiate(cfg.optimizer, _convert_="all"),
        scheduler=instantiate(cfg.scheduler, _convert_="all") if cfg.get("scheduler") else None,
        grad_clip=cfg.get("grad_clip"),
        seed=cfg.seed,
    )


def build_trainer(cfg: DictConfig, extra_callbacks: list[Any] = ()) -> tuple[Any, list[Any]]:
    """(Trainer, the configured callbacks) with the configured loggers; groups may be empty."""
    from hydra.utils import instantiate

    use_native_crc32c()  # the TensorBoard logger's event files

    def group(key: str) -> list[Any]:
        return [instantiate(c) for c in (cfg.get(key) or {}).values() if c is not None]

    callbacks, no_bar = process.without_progress_bar_off_tty(group("callbacks"))
    everything = [*callbacks, *extra_callbacks]
    trainer = instantiate(cfg.trainer, callbacks=everything, logger=group("logger"), **no_bar)
    return trainer, callbacks


def _fit_and_test(cfg: DictConfig, clock: dict[str, float]) -> dict[str, Any]:
    import lightning.pytorch as pl  # heavy imports only once a run really starts
    from hydra.utils import instantiate

    from normlab.run.checkpoints import safety_callbacks

    process.quiet_lightning()
    process.set_threads(cfg)
    process.skip_nvml_probe_on_cpu(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.load()  # missing files fail here, before a model or trainer exists
    module = build_module(cfg, datamodule)
    trainer, callbacks = build_trainer(cfg, safety_callbacks(cfg))
    clock["fit"] = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    fit_metrics = _scalars(trainer.callback_metrics)
    trainer.test(module, datamodule=datamodule, verbose=False)
    clock["trained"] = time.perf_counter()
    metrics = {**fit_metrics, **_scalars(trainer.callback_metrics)}
    summary: dict[str, Any] = {k: metrics[k] for k in METRICS if k in metrics}
    summary["epochs"], summary["steps"] = _progress(trainer)
    if "diverged_at_step" in metrics:  # the module stopped on a non-finite loss
        summary["diverged_at_step"] = int(metrics["diverged_at_step"])
    summary["ics"] = merge_summaries(callbacks)
    summary["depth"] = merge_depth(callbacks)
    summary["hparams"] = dashboard.hparams_of(cfg)
    dashboard.log_hparams(trainer, cfg)
    return summary


def _progress(trainer: Any) -> tuple[int, int]:
    """(epochs, optimizer steps) trained. Under spawned DDP (trainer=ddp_cpu) this process's loop
    counters stay at 0; Lightning hands back the path of rank 0's checkpoint, which has them."""
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if trainer.global_step == 0 and checkpoint:
        import torch

        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        return saved["epoch"] + 1, saved["global_step"]
    return trainer.current_epoch, trainer.global_step


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        result = train(cfg)
    except RunInterrupted:
        if keeps_interruption():  # the command line (summary, exit 130/143), or a SLURM job
            raise  # (no result for submitit: a requeued job's next attempt gives the outcome)
        return float("nan")  # a joblib worker: the launcher process stops the sweep
    except Exception as error:
        message = one_line(error)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if is_multirun():  # recorded in metrics.json; the sweep goes on and fails at its end
            log.error(message)
            return float("nan")  # a failed trial for sweepers that optimise the return value
        print(f"normlab: error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)  # 2: bad config or data
    log.info("%s", OmegaConf.to_yaml({k: v for k, v in result.items() if k not in SUMMARIES}))
    return result.get("val/acc")


def main() -> None:
    """Command line entry point (`python train.py`, `normlab-train`)."""
    from normlab.run.cli import run_command_line

    run_command_line(_hydra_main, sys.argv[1:])


if __name__ == "__main__":
    main()
