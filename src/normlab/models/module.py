"""The LightningModule: a backbone trained with cross-entropy and Adam, metrics from torchmetrics.

Optimization is manual so that one Lightning step may run several optimizer steps
(`steps_per_call`): the data loader hands over a stack of K mini-batches and `training_step`
walks through them. Lightning's per-step bookkeeping is then paid once per K optimizer steps,
while `trainer.global_step` still counts optimizer steps (Lightning increments it on every
`optimizer.step()` in manual mode), so checkpoints, logging cadence and ICS callbacks keep
meaning optimizer steps.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy


class ClassifierModule(pl.LightningModule):
    """Wraps any backbone mapping a batch of inputs to class logits."""

    def __init__(self, backbone: nn.Module, num_classes: int, lr: float, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.automatic_optimization = False
        self.backbone = backbone
        self.lr = lr
        self.seed = seed
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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The fused kernel updates all parameters in one call: for small nets the optimizer's
        # per-parameter Python loop, not arithmetic, dominates a step. Same maths as Adam.
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=_fused_adam_ok(self))

    def on_train_epoch_start(self) -> None:
        # Dropout masks depend only on (seed, epoch), so a resumed run repeats the straight one.
        torch.manual_seed(self.seed * 1_000_003 + self.current_epoch)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        xs, ys = batch
        optimizer = self.optimizers()
        first_step = self.global_step
        losses, all_logits = [], []
        for x, y in zip(xs, ys, strict=True):
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
            all_logits.append(logits.detach())
            losses.append(loss.detach())
        # Metrics are updated once per call, not per optimizer step: same numbers, less overhead
        # (equal-size batches, so the mean of their losses weighted by all samples is the same).
        losses_tensor = torch.stack(losses)
        self._update("train", torch.cat(all_logits), ys.reshape(-1), losses_tensor.mean())
        self._stop_if_diverged(losses_tensor, first_step)

    def _stop_if_diverged(self, losses: torch.Tensor, first_step: int) -> None:
        """Stop training at the first non-finite loss and remember its (1-based) optimizer step."""
        # One host sync per Lightning step (not per optimizer step): index of the first bad loss.
        steps = torch.arange(len(losses), device=losses.device)
        first_bad = torch.where(torch.isfinite(losses), len(losses), steps).min()
        if self.trainer.world_size > 1:  # every rank must stop at the same step, or DDP hangs
            first_bad = self.trainer.strategy.reduce(first_bad, reduce_op="min")
        first_bad = int(first_bad)
        if first_bad < len(losses):
            # via callback_metrics the step reaches train.py, from ddp_spawn workers too
            self.log("diverged_at_step", float(first_step + first_bad + 1))
            self.trainer.should_stop = True

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


def _fused_adam_ok(module: nn.Module) -> bool:
    """torch's fused Adam takes floating-point parameters on CPU or CUDA."""
    return all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in module.parameters()
    )
