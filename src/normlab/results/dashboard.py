"""What TensorBoard shows besides the per-step logs: run names, hparams, the sweep's figures.

- Each job's TensorBoard run is named by its task overrides (`norm=bn,seed=1`: Hydra's
  `override_dirname`, sorted, so the same job has the same name in every sweep); see
  conf/logger/tensorboard.yaml.
- Each run records its swept choices as hparams with `val/acc` and `test/acc` as metrics, so the
  HPARAMS tab compares a whole sweep.
- The custom-scalars dashboard of a run (`ics_layout`; written by the ICS callbacks, with the
  sections other callbacks contribute): each layer's p15..p85 band, in forward order.
- When a sweep ends, the report's figures (accuracy curves, ICS bands per group and layer) are
  written as images into `<sweep dir>/tensorboard/_sweep`: the landing page (Time Series) shows
  the comparison first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.results.checksums import use_native_crc32c
from normlab.results.runs import sorted_layers

# Config groups whose chosen option is an hparam, and top-level keys that are.
HPARAM_GROUPS = ("data", "model", "norm", "weights", "activation", "init", "optimizer", "scheduler")
HPARAM_KEYS = {"lr": "lr", "dropout": "dropout", "data.batch_size": "batch_size", "seed": "seed",
               "norm.position": "position", "grad_clip": "grad_clip"}
HPARAM_METRICS = ("val/acc", "test/acc")
SWEEP_RUN = "tensorboard/_sweep"


def run_name() -> str:
    """The running job's task overrides as a run name, e.g. `norm=bn,seed=1`; '' without any.

    Keys that say where rather than what are left out (conf/hydra/default.yaml); a "/" in a value
    would nest TensorBoard runs, so it becomes "_".
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return str(HydraConfig.get().job.override_dirname).replace("/", "_")


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The choices that make runs differ: group options (by name) and the key numbers."""
    choices = _group_choices()
    params: dict[str, Any] = {}
    for group in HPARAM_GROUPS:
        name = choices.get(group) or _class_name(OmegaConf.select(cfg, f"{group}._target_"))
        if name is not None:
            params[group] = str(name)
    for key, name in HPARAM_KEYS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None:
            params[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return params


def _class_name(target: str | None) -> str | None:
    """Outside a Hydra job (no group choices known): the class a group builds, by its name."""
    return None if target is None else target.rsplit(".", 1)[-1]


def _group_choices() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if isinstance(v, str)}


def log_hparams(trainer: Any, cfg: DictConfig) -> None:
    """Write the run's hparams into each of its TensorBoard runs (rank 0). Their metric values are
    the run's own `val/acc` and `test/acc` scalars. A fresh writer: Lightning closed its own."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    if not trainer.is_global_zero:
        return
    from normlab.results.runs import is_multirun

    log_dirs = [lg.log_dir for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    experiment, start, end = hparams(hparams_of(cfg), dict.fromkeys(HPARAM_METRICS, 0.0))
    # In a sweep the experiment (which hparams, which values) is written once at its end, from
    # every job (`write_sweep_figures`); TensorBoard reads the first experiment it finds.
    summaries = (start, end) if is_multirun() else (experiment, start, end)
    for log_dir in log_dirs:
        with SummaryWriter(log_dir) as writer:
            for summary in summaries:
                writer.file_writer.add_summary(summary)


def _sweep_experiment(jobs: list[dict[str, Any]]) -> Any:
    """The hparams experiment of a whole sweep: every hparam with the values its jobs took."""
    from torch.utils.tensorboard.summary import hparams

    params = [job.get("hparams") or {} for job in jobs]
    names = sorted({name for p in params for name in p})
    first = {name: next(p[name] for p in params if name in p) for name in names}
    domains = {
        name: sorted({p[name] for p in params if name in p})
        for name in names
        if isinstance(first[name], str)
    }
    experiment, _, _ = hparams(first, dict.fromkeys(HPARAM_METRICS, 0.0), domains)
    return experiment


def write_sweep_figures(sweep_dir: Path, part: str | None = None) -> Path:
    """The report's accuracy and ICS figures and the depth probe's figures as images in
    `<sweep dir>/tensorboard/_sweep`, and the sweep's hparams experiment. `part` (one of
    FIGURE_PARTS) writes only that part, in its own event file: the parts can be drawn at once,
    in separate processes."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from torch.utils.tensorboard import SummaryWriter

    use_native_crc32c()
    run_dir = sweep_dir / SWEEP_RUN
    with SummaryWriter(str(run_dir)) as writer:
        for name in [part] if part else FIGURE_PARTS:
            for tag, figure in FIGURE_PARTS[name](sweep_dir, writer).items():
                figure.set_dpi(FIGURE_DPI)  # TensorBoard shows images at their pixel size
                canvas = FigureCanvasAgg(figure)
                canvas.draw()
                image = np.asarray(canvas.buffer_rgba())[..., :3]
                writer.add_image(tag, image, 0, dataformats="HWC")
    return run_dir


def _report_figures(sweep_dir: Path, writer: Any) -> dict[str, Any]:
    """The accuracy curves and ICS bands per group (normlab.results.report), and the sweep's
    hparams experiment."""
    from normlab.results import report
    from normlab.results.runs import collect_jobs

    writer.file_writer.add_summary(_sweep_experiment(collect_jobs(sweep_dir)))
    jobs = report.jobs_frame(sweep_dir)
    scalars = report.job_scalars(sweep_dir, jobs)
    return {
        "comparison/ics_bands": report.plot_ics(jobs, scalars),
        "comparison/accuracy": report.plot_curves(jobs, scalars),
    }


def _depth_figures(sweep_dir: Path, writer: Any) -> dict[str, Any]:
    """The gradient profile and representation rank per group (normlab.results.depth)."""
    from normlab.results.depth import sweep_figures

    return sweep_figures(sweep_dir)


FIGURE_PARTS = {"report": _report_figures, "depth": _depth_figures}
FIGURE_DPI = 100


def tensorboard_hint(sweep_dir: Path) -> str:
    """The command that opens this sweep in TensorBoard, and where to look."""
    return (
        f"See it in TensorBoard: tensorboard --logdir {sweep_dir}\n"
        "  http://localhost:6006/#timeseries      comparison figures first (comparison/...)\n"
        "  http://localhost:6006/#custom_scalars  ICS: p15-p85 band per layer, runs overlaid\n"
        "  http://localhost:6006/#hparams         every job's choices with val/acc and test/acc"
    )


Layout = dict[str, dict[str, list]]


def ics_layout(layers: list[str], sections: Layout | None = None, grads: bool = True) -> Layout:
    """The p15..p85 band (margin chart around p50) of each layer's input, in forward order;
    then the sections other callbacks contribute; then gradient norms when they are logged."""
    layout: Layout = {
        "ICS: input of each nonlinearity (p50, band p15-p85)": {
            layer: ["Margin", [f"ics/{layer}/p50", f"ics/{layer}/p15", f"ics/{layer}/p85"]]
            for layer in sorted_layers(layers)
        },
        **(sections or {}),
    }
    if grads:
        layout["Gradient norms"] = {"grads": ["Multiline", [r"grads/.*/norm"]]}
    return layout
