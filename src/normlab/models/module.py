"""The LightningModule: a backbone trained with cross-entropy, the configured optimizer and
learning-rate schedule, metrics from torchmetrics.

Optimization is manual so that one Lightning batch may run several optimizer steps
(`data.steps_per_batch`): the data loader hands over a `MiniBatchStack` of K mini-batches and
`training_step` walks through them. Lightning's per-batch bookkeeping is then paid once per K
optimizer steps, while `trainer.global_step` still counts optimizer steps (Lightning increments it
on every `optimizer.step()` in manual mode). Everything step-based therefore means optimizer
steps: `trainer.max_steps` (the last stack is cut short), the scheduler (stepped after every
optimizer step), `trainer.log_every_n_steps` (the cadence of `train/lr`), checkpoints and the ICS
callbacks.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from normlab.data.batches import MiniBatchStack

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

DEFAULT_OPTIMIZER: OptimizerFactory = partial(torch.optim.Adam, lr=1e-3)

# Scheduler arguments that, left None in the config, mean "the whole run" in optimizer steps.
RUN_LENGTH_ARGS = ("T_max", "total_steps")

class ClassifierModule(pl.LightningModule):
    """Wraps any backbone mapping a batch of inputs to class logits.

    `optimizer` and `scheduler` are factories (Hydra `_partial_: true` configs): the optimizer
    receives the parameters, the scheduler the optimizer. `grad_clip` clips the total gradient
    norm before every optimizer step.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        scheduler: SchedulerFactory | None = None,
        grad_clip: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        self.automatic_optimization = False
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.grad_clip = grad_clip
        self.seed = seed
        self.current_minibatch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{kind}": (
                    MulticlassAccuracy(num_classes, average="micro", validate_args=False)
                    if kind == "acc"
                    else MeanMetric()
                )
                for stage in ("train", "val", "test")
                for kind in ("acc", "loss")
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def nonlinearities(self) -> dict[str, nn.Module]:
        """Activation modules by layer name (`layer1`, ...), for the ICS callbacks."""
        return self.backbone.nonlinearities()

    def norm_layers(self) -> dict[str, nn.Module]:
        """Norm modules by layer name, for the ICS callbacks (`norm_out/<layer>`); may be empty."""
        return self.backbone.norm_layers() if hasattr(self.backbone, "norm_layers") else {}

    def weight_layers(self) -> dict[str, nn.Module]:
        """Linear/Conv modules by layer name (`layer1`, ..., `head`), for the ICS callbacks."""
        return self.backbone.weight_layers()

    def configure_optimizers(self) -> Any:
        optimizer = _with_fused_resolved(self.optimizer_factory, self)(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = _with_run_length(self.scheduler_factory, self.total_optimizer_steps)
        # interval "step": stepped here after every optimizer step (manual optimization); listed
        # so that Lightning saves and restores its state with the checkpoint.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler(optimizer)}}

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: `trainer.max_steps`, or the epochs' steps if fewer."""
        trainer = self.trainer
        trainer.estimated_stepping_batches  # noqa: B018 - sets up the train loader and its length
        loader = trainer.train_dataloader
        per_batch = getattr(loader, "steps_per_batch", 1)
        per_epoch = trainer.num_training_batches * per_batch  # the last stack may be short:
        per_epoch = min(per_epoch, getattr(loader, "steps_per_epoch", per_epoch))
        limits = [trainer.max_steps] if trainer.max_steps >= 0 else []
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            limits.append(per_epoch * trainer.max_epochs)
        return max(1, min(limits)) if limits else 1

    def on_train_epoch_start(self) -> None:
        # Dropout masks depend only on (seed, epoch), so a resumed run repeats the straight one.
        torch.manual_seed(self.seed * 1_000_003 + self.current_epoch)

    def training_step(self, batch: MiniBatchStack, batch_idx: int) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        log_every = self.trainer.log_every_n_steps
        losses, all_logits, all_y = [], [], []
        for x, y in itertools.islice(batch.minibatches(), self._steps_left(len(batch))):
            self.current_minibatch = (x, y)
            if self.global_step % log_every == 0:
                self._log_lr(optimizer)
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            if self.grad_clip is not None:
                self.clip_gradients(optimizer, self.grad_clip, gradient_clip_algorithm="norm")
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            all_logits.append(logits.detach())
            all_y.append(y)
            losses.append(loss.detach())
            if self._diverged(loss):
                break
        if not losses:  # max_steps already reached (e.g. resuming a finished run)
            return
        # Metrics are updated once per batch, not per optimizer step: same numbers, less overhead
        # (equal-size batches, so the mean of their losses weighted by all samples is the same).
        self._update("train", torch.cat(all_logits), torch.cat(all_y), torch.stack(losses).mean())

    def _steps_left(self, stack_size: int) -> int:
        """Steps to run from this stack: all of them, or fewer when `max_steps` is reached."""
        max_steps = self.trainer.max_steps
        return stack_size if max_steps < 0 else min(stack_size, max_steps - self.global_step)

    def _diverged(self, loss: torch.Tensor) -> bool:
        """True (and training told to stop) at the first non-finite loss, which is recorded as
        `diverged_at_step`: the optimizer step just taken, so `steps` in metrics.json equals it."""
        # One host read per optimizer step: on CPU `item()` is ~20x cheaper than a tensor test.
        bad = not math.isfinite(loss.item())
        if self.trainer.world_size > 1:  # every rank must stop at the same step, or DDP hangs
            flag = torch.tensor(float(bad), device=loss.device)
            bad = bool(self.trainer.strategy.reduce(flag, reduce_op="max") > 0)
        if not bad:
            return False
        # via callback_metrics the step reaches train.py, from ddp_spawn workers too
        self.log("diverged_at_step", float(self.global_step))
        self.trainer.should_stop = True
        return True

    def _log_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """`train/lr` of the coming optimizer step, on the optimizer-step axis."""
        lr = optimizer.param_groups[0]["lr"]
        for logger in self.loggers:
            logger.log_metrics({"train/lr": float(lr)}, step=self.global_step)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _evaluate(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        logits = self(x)
        self._update(stage, logits, y, F.cross_entropy(logits, y))

    def _update(
        self, stage: str, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor
    ) -> None:
        self.metrics[f"{stage}_acc"].update(logits, y)
        self.metrics[f"{stage}_loss"].update(loss, weight=y.shape[0])

    def _log_epoch(self, stage: str) -> None:
        # compute() gathers the metric state of all DDP processes: every rank logs the global value.
        for kind in ("loss", "acc"):
            metric = self.metrics[f"{stage}_{kind}"]
            self.log(f"{stage}/{kind}", metric.compute(), prog_bar=stage != "test")
            metric.reset()
        # Lightning's default x-axis counts Lightning batches; with several optimizer steps per
        # batch that is not the optimizer step the ICS scalars use. A logged "step" overrides it.
        self.log("step", float(self.global_step))


def _with_fused_resolved(factory: OptimizerFactory, module: nn.Module) -> OptimizerFactory:
    """`fused=None` in the config means: torch's fused kernel when the parameters allow it.

    The fused kernel updates all parameters in one call: for small nets the optimizer's
    per-parameter Python loop, not arithmetic, dominates a step. Same maths.
    """
    if not isinstance(factory, partial) or factory.keywords.get("fused", False) is not None:
        return factory
    fused = _fused_ok(module) and "fused" in inspect.signature(factory.func).parameters
    return partial(factory.func, *factory.args, **{**factory.keywords, "fused": fused or None})


def _fused_ok(module: nn.Module) -> bool:
    """torch's fused optimizers take floating-point parameters on CPU or CUDA."""
    return all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in module.parameters()
    )


def _with_run_length(factory: SchedulerFactory, total_steps: Callable[[], int]) -> SchedulerFactory:
    """Fill a scheduler's run-length argument left None (`T_max`, `total_steps`) with the run's
    total optimizer steps."""
    if not isinstance(factory, partial):
        return factory
    unset = [k for k in RUN_LENGTH_ARGS if k in factory.keywords and factory.keywords[k] is None]
    if not unset:
        return factory
    return partial(factory, **{key: total_steps() for key in unset})
