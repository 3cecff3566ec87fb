"""The loss landscape along the gradient (Santurkar et al. 2018, "How does batch normalization help
optimization?", Fig. 4), measured at real training steps.

At an optimizer step with parameters x, mini-batch B and the gradient g the optimizer is about to
use, the probe *evaluates* (never takes) the steps x - eta * g for `num_points` step sizes eta
spaced geometrically over [0.5, 4] x the current learning rate, on the same batch:

- `landscape/loss_min`, `landscape/loss_max`: the range of L(x - eta g) over those eta (Fig. 4a);
- `landscape/grad_pred_max`: max over eta of ||grad L(x) - grad L(x - eta g)||_2, gradient
  predictiveness (Fig. 4b; small = the gradient stays a good guide along the step);
- `landscape/beta_smooth`: max over eta of ||grad L(x) - grad L(x - eta g)|| / ||eta g||, the
  effective beta-smoothness (Fig. 4c). On a quadratic L = w^T H w / 2 it is ||H g|| / ||g||.

The loss is the training-mode loss as training sees it (BN with batch statistics, dropout on).
The probe works on copies (`torch.func.functional_call`): the model's parameters, its `.grad`,
the optimizer state and BN's running statistics are never written; the random stream is forked
and every evaluation replays the same draws, so all points share one dropout mask and training
goes on with the numbers it would have drawn without the probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean

import torch
import torch.nn.functional as F
from torch.func import functional_call

from normlab.callbacks.ics import RecordingCallback, StepCadence, log_scalars
from normlab.callbacks.no_trace import rng_rewinder, rng_untouched
from normlab.results.runs import loss_band

Params = dict[str, torch.Tensor]
MEASURES = ("loss_min", "loss_max", "grad_pred_max", "beta_smooth")


def step_sizes(lr: float, num_points: int, eta_range: Sequence[float] = (0.5, 4.0)) -> list[float]:
    """`num_points` step sizes spaced geometrically over eta_range x lr (both ends included)."""
    low, high = (lr * factor for factor in eta_range)
    if num_points == 1:
        return [low]
    return [low * (high / low) ** (i / (num_points - 1)) for i in range(num_points)]


def loss_and_grad(
    loss_at: Callable[[Params], torch.Tensor], point: Params
) -> tuple[float, torch.Tensor]:
    """L(point) and grad L(point) as one flat vector, computed on leaf copies (nothing of the
    caller's is touched)."""
    leaves = {name: value.detach().requires_grad_() for name, value in point.items()}
    with torch.enable_grad():
        loss = loss_at(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    flat = [
        (torch.zeros_like(leaf) if grad is None else grad).reshape(-1)
        for leaf, grad in zip(leaves.values(), grads, strict=True)
    ]
    return loss.item(), torch.cat(flat)


def landscape(
    loss_at: Callable[[Params], torch.Tensor],
    params: Params,
    direction: Params,
    etas: Sequence[float],
) -> dict[str, float]:
    """The four measures at `params` along `-direction` (see the module docstring)."""
    _, grad_here = loss_and_grad(loss_at, params)
    direction_norm = torch.cat([d.reshape(-1) for d in direction.values()]).norm().item()
    losses, grad_changes, smoothness = [], [], []
    for eta in etas:
        point = {name: value.detach() - eta * direction[name] for name, value in params.items()}
        loss, grad_there = loss_and_grad(loss_at, point)
        change = (grad_here - grad_there).norm().item()
        losses.append(loss)
        grad_changes.append(change)
        smoothness.append(change / (eta * direction_norm) if direction_norm > 0 else math.nan)
    return {
        "loss_min": min(losses),
        "loss_max": max(losses),
        "grad_pred_max": max(grad_changes),
        "beta_smooth": max(smoothness),
    }


def training_loss_at(
    module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[Params], torch.Tensor]:
    """Params -> the module's cross-entropy on (x, y) in its current mode, with copies of its
    buffers (BN's running statistics move in the copies only) and the same random draws at every
    call (the caller forks the RNG around the whole probe)."""
    buffers = dict(module.named_buffers())
    rewind = rng_rewinder([x.device] if x.device.type == "cuda" else [])

    def loss_at(params: Params) -> torch.Tensor:
        rewind()
        copies = {name: b.clone() for name, b in buffers.items()}
        return F.cross_entropy(functional_call(module, (params, copies), (x,)), y)

    return loss_at


def probe_module(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    num_points: int = 8,
    eta_range: Sequence[float] = (0.5, 4.0),
) -> dict[str, float]:
    """The measures for `module` at its current weights along the gradient in `.grad`."""
    named = dict(module.named_parameters())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = {n: p for n, p in named.items() if id(p) in in_optimizer and p.grad is not None}
    direction = {n: p.grad.detach() for n, p in params.items()}
    frozen = {n: p.detach() for n, p in named.items() if n not in params}
    etas = step_sizes(optimizer.param_groups[0]["lr"], num_points, eta_range)
    with rng_untouched(x.device):
        loss_on_batch = training_loss_at(module, x, y)
        return landscape(lambda p: loss_on_batch({**frozen, **p}), params, direction, etas)


class LossLandscape(RecordingCallback):
    """Logs `landscape/{loss_min,loss_max,grad_pred_max,beta_smooth}` every N optimizer steps.

    Measured in `on_before_optimizer_step` (the gradient is final, the update not yet taken) on
    the step's own mini-batch, at every multiple of N exactly, rank 0 only. Costs 1 + num_points
    forward/backward passes per measurement.
    """

    prefix = "landscape/"

    def __init__(
        self,
        every_n_steps: int = 100,
        num_points: int = 8,
        eta_range: Sequence[float] = (0.5, 4.0),
        output_dir: str | Path | None = None,
    ) -> None:
        super().__init__(output_dir)
        if num_points < 1:
            raise ValueError(f"landscape num_points={num_points} must be >= 1")
        if len(eta_range) != 2 or not 0 < eta_range[0] <= eta_range[1]:
            raise ValueError(f"landscape eta_range={list(eta_range)} must be [low, high], 0 < low")
        self.cadence = StepCadence(every_n_steps)
        self.num_points = num_points
        self.eta_range = tuple(eta_range)

    def current_minibatch(self, trainer, pl_module) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) of the optimizer step being run (set by the module before its forward)."""
        return pl_module.current_minibatch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        if not (trainer.is_global_zero and self.cadence.due(step)):
            return
        x, y = self.current_minibatch(trainer, pl_module)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper -> torch's
        numbers = probe_module(pl_module, optimizer, x, y, self.num_points, self.eta_range)
        metrics = {f"landscape/{k}": v for k, v in numbers.items() if math.isfinite(v)}
        if metrics:
            log_scalars(trainer, metrics, step)
            self.record(metrics, step)

    def ics_summary(self) -> dict[str, dict[str, float]]:
        """`{"landscape": {"<measure>_mean": mean over the measured steps, ...}}`."""
        series = self.series()
        summary = {
            f"{measure}_mean": fmean(series[f"landscape/{measure}"].values())
            for measure in MEASURES
            if series.get(f"landscape/{measure}")
        }
        bands = loss_band(series)
        if bands:
            summary["loss_band_mean"] = fmean(bands.values())
        if summary:
            summary["measurements"] = len(series.get("landscape/loss_min", {}))
        return {"landscape": summary} if summary else {}
