"""Optimizer and learning-rate schedule as config, grad_clip, exact max_steps, divergence.

Every step count here is in optimizer steps; several tests use stacks of mini-batches
(`data.steps_per_batch` > 1) to check that a Lightning batch of K steps changes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import cli_error, compose_cfg, run_cli
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from normlab.train import build_module, build_trainer, train

LR = 0.05
QUICK = ("~callbacks", "trainer.max_epochs=-1")


def lr_points(run_dir: Path) -> dict[int, float]:
    """`train/lr` read back from the run's TensorBoard event files: {optimizer step: lr}."""
    points = {}
    for folder in {p.parent for p in run_dir.rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "train/lr" in accumulator.Tags()["scalars"]:
            points.update({e.step: e.value for e in accumulator.Scalars("train/lr")})
    return points


def saved(run_dir: Path) -> dict:
    """The run's checkpoint (last.ckpt, or Lightning's default name without our callbacks)."""
    (path,) = (run_dir / "checkpoints").glob("*.ckpt")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("scheduler", ["none", "cosine", "step", "warmup_cosine"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adamw"])
def test_every_optimizer_and_scheduler_trains_and_steps_per_optimizer_step(
    tmp_path, optimizer, scheduler
):
    cfg = compose_cfg(tmp_path, f"optimizer={optimizer}", f"scheduler={scheduler}", *QUICK,
                      "trainer.max_steps=7", "data.steps_per_batch=3", "~logger")
    result = train(cfg)
    assert result["status"] == "ok" and result["steps"] == 7
    checkpoint = saved(tmp_path)
    (optimizer_state,) = checkpoint["optimizer_states"]
    lr = optimizer_state["param_groups"][0]["lr"]
    if scheduler == "none":
        assert checkpoint["lr_schedulers"] == [] and lr == 0.01
    else:  # 7 optimizer steps in stacks of 3: stepped 7 times, not 3
        (state,) = checkpoint["lr_schedulers"]
        assert state["last_epoch"] == 7 and state["_last_lr"] == [lr]


def closed_form(scheduler: str, k: int, total: int) -> float:
    """lr of optimizer step k (0-based) in a run of `total` steps, with the configs' defaults."""
    if scheduler == "none":
        return LR
    if scheduler == "cosine":
        return LR * (1 + math.cos(math.pi * k / total)) / 2
    if scheduler == "step":  # step_size=4, gamma=0.5 below
        return LR * 0.5 ** (k // 4)
    warmup, start = 5, 0.01  # warmup_cosine, warmup_steps=5 below
    if k < warmup:
        return LR * (start + (1 - start) * k / warmup)
    return LR * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("scheduler", ["none", "cosine", "step", "warmup_cosine"])
def test_lr_follows_the_closed_form_at_every_optimizer_step(tmp_path, scheduler):
    extra = {"step": ["scheduler.step_size=4", "scheduler.gamma=0.5"],
             "warmup_cosine": ["scheduler.warmup_steps=5"]}.get(scheduler, [])
    result = train(compose_cfg(tmp_path, f"scheduler={scheduler}", *extra, f"lr={LR}",
                               "optimizer=sgd", "data.steps_per_batch=4", "trainer.max_epochs=1",
                               "~callbacks", "trainer.log_every_n_steps=1"))
    total = result["steps"]
    assert total == 37  # digits: 1,197 training images in batches of 32
    points = lr_points(tmp_path / "tensorboard")
    assert sorted(points) == list(range(total))
    for k, lr in points.items():
        assert lr == pytest.approx(closed_form(scheduler, k, total), rel=1e-5, abs=1e-9), k


def test_train_lr_in_the_default_run_and_decreasing_under_cosine(tmp_path):
    train(compose_cfg(tmp_path / "none", "trainer.max_epochs=2"))
    every_5 = "trainer.log_every_n_steps=5"
    train(compose_cfg(tmp_path / "cos", "trainer.max_epochs=2", "scheduler=cosine", every_5))
    constant, cosine = lr_points(tmp_path / "none"), lr_points(tmp_path / "cos")
    assert sorted(constant) == [0, 50]  # default: every 50 optimizer steps
    assert all(v == pytest.approx(0.01) for v in constant.values())
    assert sorted(cosine) == list(range(0, 74, 5))
    values = [cosine[k] for k in sorted(cosine)]
    assert values[0] == pytest.approx(0.01) and values[-1] < 0.001
    assert all(b < a for a, b in zip(values[1:], values[2:], strict=False))  # 0 and 1: both lr
    assert saved(tmp_path / "cos")["lr_schedulers"][0]["T_max"] == 74  # the whole run by default


def test_cosine_t_max_is_the_runs_optimizer_steps(tmp_path):
    for steps_per_batch in (1, 5, 32):
        run = tmp_path / str(steps_per_batch)
        train(compose_cfg(run, "scheduler=cosine", "trainer.max_epochs=3", "~callbacks",
                          "~logger", f"data.steps_per_batch={steps_per_batch}"))
        assert saved(run)["lr_schedulers"][0]["T_max"] == 3 * 37
    train(compose_cfg(tmp_path / "ms", "scheduler=cosine", "trainer.max_steps=50", *QUICK,
                      "~logger"))
    assert saved(tmp_path / "ms")["lr_schedulers"][0]["T_max"] == 50


def test_sgd_with_momentum_trains_digits(tmp_path):
    result = train(compose_cfg(tmp_path, "optimizer=sgd", "lr=0.1", "optimizer.momentum=0.9"))
    assert result["status"] == "ok" and result["val/acc"] >= 0.9


def test_optimizer_options_reach_torch_and_fused_is_decided_at_build(tmp_path):
    cfg = compose_cfg(tmp_path, "optimizer=sgd", "optimizer.momentum=0.8",
                      "optimizer.nesterov=true", "optimizer.weight_decay=0.001")
    datamodule = instantiate(cfg.data)
    optimizer = build_module(cfg, datamodule).configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.01, 0.8, True, 0.001)
    assert group["fused"] is True  # CPU float parameters: torch's fused kernel
    cfg = compose_cfg(tmp_path, "optimizer=adamw", "optimizer.fused=false")
    optimizer = build_module(cfg, datamodule).configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.param_groups[0]["fused"]


class GradNorms:
    """Total gradient norm seen inside every optimizer step (after the module's clipping)."""

    def __init__(self):
        from lightning.pytorch import Callback

        norms = self.norms = []

        class Hook(Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
                norms.append(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g) for g in grads])).item())

        self.callback = Hook()


@pytest.mark.parametrize("clip", [None, 0.05])
def test_grad_clip_bounds_the_total_gradient_norm(tmp_path, clip):
    cfg = compose_cfg(tmp_path, f"grad_clip={'null' if clip is None else clip}", "norm=none",
                      "trainer.max_steps=40", *QUICK, "~logger")
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    probe = GradNorms()
    trainer, _ = build_trainer(cfg, extra_callbacks=[probe.callback])
    trainer.fit(module, datamodule=datamodule)
    assert len(probe.norms) == 40
    if clip is None:  # the same run unclipped: the clip is really below the gradients' norm
        assert max(probe.norms) > 4 * 0.05
    else:
        assert max(probe.norms) <= clip * (1 + 1e-5)
        assert min(probe.norms) > clip * 0.99  # norms above the clip are scaled to it exactly


@pytest.mark.parametrize("steps_per_batch", [1, 7, 32, 64])
def test_max_steps_stops_at_exactly_that_many_optimizer_steps(tmp_path, steps_per_batch):
    result = train(compose_cfg(tmp_path, "trainer.max_steps=45", *QUICK, "~logger",
                               f"data.steps_per_batch={steps_per_batch}"))
    assert result["steps"] == 45  # over one epoch of 37: the epoch boundary is crossed too
    assert saved(tmp_path)["global_step"] == 45


@pytest.mark.slow  # spawns processes: in CI's `pytest -m slow`, out of the default run
def test_max_steps_100_in_metrics_json_through_the_cli(tmp_path):
    proc = run_cli("trainer.max_steps=100", "trainer.max_epochs=-1", "~callbacks",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-1500:]
    import json

    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 100


def test_divergence_stops_at_the_first_non_finite_loss(tmp_path):
    results = {}
    for steps_per_batch in (1, 32):
        results[steps_per_batch] = train(compose_cfg(
            tmp_path / str(steps_per_batch), "norm=none", "lr=1e20", "init=normal", "~callbacks",
            "~logger", f"data.steps_per_batch={steps_per_batch}"))
    one, stacked = results[1], results[32]
    assert one["status"] == stacked["status"] == "diverged"
    assert stacked["diverged_at_step"] == one["diverged_at_step"]  # same step, stack or not
    assert 1 <= stacked["diverged_at_step"] < 32  # inside the first stack
    assert stacked["steps"] == stacked["diverged_at_step"] == one["steps"]


@pytest.mark.slow  # spawns processes: in CI's `pytest -m slow`, out of the default run
def test_old_steps_per_call_key_still_works_with_one_warning_line(tmp_path):
    proc = run_cli("data.steps_per_call=5", "trainer.max_steps=7", "trainer.max_epochs=-1",
                   "~callbacks", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-1500:]
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if "deprecated" in line]
    assert len(lines) == 1
    assert "data.steps_per_call=5 is deprecated: use data.steps_per_batch=5" in lines[0]


def test_datamodule_takes_the_old_name(caplog):
    from normlab.data.datamodule import NormLabDataModule

    assert NormLabDataModule(steps_per_call=5).steps_per_batch == 5
    assert "use data.steps_per_batch=5" in caplog.text
    assert NormLabDataModule(steps_per_batch=4).steps_per_batch == 4


BAD_INPUTS = [
    ("trainer.gradient_clip_val=1", "trainer.gradient_clip_val=1: normlab optimizes manually"),
    ("trainer.gradient_clip_algorithm=value", "trainer.gradient_clip_algorithm=value: normlab"),
    ("trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4: normlab optimizes"),
    ("trainer.limit_train_batches=5", "trainer.limit_train_batches=5 counts Lightning batches"),
    ("trainer.val_check_interval=10", "trainer.val_check_interval=10 counts Lightning batches"),
    ("grad_clip=0", "grad_clip=0 is out of range: it must be > 0"),
    ("data.steps_per_batch=0", "data.steps_per_batch=0 is out of range: it must be an integer"),
    ("optimizer.momentum=1.5", "optimizer.momentum=1.5 is out of range: it must be in [0, 1)"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1 is out of range: it must be >= 0"),
    ("optimizer.nesterov=true", "optimizer.nesterov=true needs momentum"),
    ("scheduler.T_max=0", "scheduler.T_max=0 is out of range: it must be an integer >= 1"),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_bad_optimization_input_is_one_clear_line(tmp_path, override, message):
    from normlab.config.validate import ConfigError, validate

    group = {"optimizer.": "optimizer=sgd", "scheduler.": "scheduler=cosine"}
    extra = [g for prefix, g in group.items() if override.startswith(prefix)]
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg(tmp_path, *extra, override))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.slow  # the same check through the real command line (a subprocess)
def test_bad_optimization_input_is_one_line_on_the_command_line(tmp_path):
    last_line = cli_error("trainer.gradient_clip_val=1", f"hydra.run.dir={tmp_path}")
    assert last_line.startswith("normlab: error: trainer.gradient_clip_val=1: normlab optimizes")
    assert last_line.endswith("use grad_clip=1")


def test_limit_train_batches_means_optimizer_steps_with_one_step_per_batch(tmp_path):
    result = train(compose_cfg(tmp_path, "trainer.limit_train_batches=5", "trainer.max_epochs=2",
                               "data.steps_per_batch=1", "~callbacks", "~logger"))
    assert result["steps"] == 10


@pytest.mark.parametrize("scheduler", [("scheduler=cosine", "scheduler.T_max=74"),
                                       ("scheduler=warmup_cosine", "scheduler.warmup_steps=10",
                                        "scheduler.total_steps=74")])
def test_resume_with_a_schedule_equals_the_straight_run(tmp_path, scheduler):
    common = ("optimizer=sgd", "optimizer.momentum=0.9", "lr=0.1", "dropout=0.2", *scheduler,
              "~callbacks.ics")
    straight = train(compose_cfg(tmp_path / "straight", *common, "trainer.max_epochs=2"))
    train(compose_cfg(tmp_path / "half", *common, "trainer.max_epochs=1"))
    half = tmp_path / "half" / "checkpoints" / "last.ckpt"
    resumed = train(compose_cfg(tmp_path / "resumed", *common, "trainer.max_epochs=2",
                                f"ckpt_path={half}"))
    a, b = saved(tmp_path / "straight"), saved(tmp_path / "resumed")
    assert a["lr_schedulers"] == b["lr_schedulers"] and a["lr_schedulers"][0]["last_epoch"] == 74
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert straight["val/loss"] == resumed["val/loss"]
