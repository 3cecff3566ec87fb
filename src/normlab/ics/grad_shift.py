"""Gradient-based internal covariate shift (Santurkar et al. 2018, "How does batch normalization
help optimization?", Definition 2.1).

For weight layer i: G = dL/dW_i at the current weights; G' = the same gradient, on the same batch,
after the optimizer has updated only the layers *before* i (their real update: the real optimizer
with its state, fed G's counterparts for those layers). `ics/<layer>/grad_shift` = ||G - G'||_2,
`ics/<layer>/grad_cos` = cos(G, G'). Layer 1 has nothing before it: 0 and 1 by definition.

"Before layer i" means every parameter registered before W_i (the backbones register in forward
order), so the norm layers' affine parameters of earlier blocks move too. The measurement leaves
no trace: parameters, optimizer state, `.grad`, BN running statistics, train/eval mode and the
random number generators are restored exactly, so training is bit-identical with or without it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from normlab.ics.cadence import StepCadence
from normlab.ics.history import RecordingCallback
from normlab.ics.sinks import log_scalars
from normlab.ics.summary import grad_shift_summary


def grad_shift(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    loss: Callable[[], torch.Tensor],
) -> dict[str, tuple[float, float]]:
    """`{layer: (||G - G'||, cos(G, G'))}` for each weight tensor in `weights` (forward order).

    `loss()` computes the loss of `model` on one fixed batch; it is called once for G and once per
    layer for G', each time with the same random numbers (same dropout masks).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    position = {id(p): i for i, p in enumerate(params)}
    result = {}
    with _no_side_effects(model, optimizer, params) as rewind:
        grads = torch.autograd.grad(loss(), params, allow_unused=True)
        for name, weight in weights.items():
            i = position[id(weight)]
            if grads[i] is None:
                continue
            if i == 0:
                result[name] = (0.0, 1.0)
                continue
            with _updated(optimizer, params[:i], grads[:i]):
                rewind()
                (after,) = torch.autograd.grad(loss(), [weight])
            result[name] = _compare(grads[i], after)
    return result


def _compare(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    a, b = before.reshape(-1).double(), after.reshape(-1).double()
    return (a - b).norm().item(), F.cosine_similarity(a, b, dim=0).item()


@contextmanager
def _no_side_effects(
    model: nn.Module, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Iterator[Callable[[], None]]:
    """Train mode, no `.grad`, and a `rewind()` of the RNGs; everything restored on exit."""
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    device = params[0].device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        cpu_state = torch.get_rng_state()
        gpu_state = torch.cuda.get_rng_state(device) if devices else None

        def rewind() -> None:
            torch.set_rng_state(cpu_state)
            if gpu_state is not None:
                torch.cuda.set_rng_state(gpu_state, device)

        try:
            for p in params:
                p.grad = None
            model.train()
            yield rewind
        finally:
            model.train(was_training)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad


@contextmanager
def _updated(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
) -> Iterator[None]:
    """`params` after one real optimizer step with `grads` (other parameters have no `.grad`, so
    the optimizer skips them); parameters and optimizer state restored on exit."""
    values = [p.detach().clone() for p in params]
    states = {p: copy.deepcopy(optimizer.state[p]) for p in params if p in optimizer.state}
    try:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        optimizer.step()
        for p in params:
            p.grad = None
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, values, strict=True):
                p.copy_(value)
        for p in params:
            _restore_state(optimizer, p, states.get(p))


def _restore_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, saved: dict | None) -> None:
    if saved is None:
        optimizer.state.pop(p, None)
        return
    state = optimizer.state[p]
    for key in list(state):
        if key not in saved:
            del state[key]
    for key, value in saved.items():
        current = state.get(key)
        if isinstance(current, torch.Tensor) and current.shape == value.shape:
            current.copy_(value)  # in place: keeps the tensors anything else may reference
        else:
            state[key] = value


class GradShift(RecordingCallback):
    """Logs `ics/<layer>/grad_shift` and `ics/<layer>/grad_cos` every N optimizer steps.

    Measured at the start of a Lightning batch, on its first mini-batch, with the module's real
    optimizer; with several optimizer steps per batch, at the start of each batch whose steps
    contain a multiple of N (logged at the batch's first step). The loss is cross-entropy.
    Rank 0 only, on its own share of the batch.
    """

    def __init__(self, every_n_steps: int = 200, output_dir: str | Path | None = None) -> None:
        super().__init__(output_dir)
        self.cadence = StepCadence(every_n_steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if not (trainer.is_global_zero and self.cadence.due_within(step, len(batch))):
            return
        x, y = batch.first()  # a MiniBatchStack
        optimizer = pl_module.optimizers(use_pl_optimizer=False)
        weights = {name: layer.weight for name, layer in pl_module.weight_layers().items()}
        shifts = grad_shift(pl_module, optimizer, weights, lambda: F.cross_entropy(pl_module(x), y))
        metrics = {}
        for name, (shift, cos) in shifts.items():
            metrics.update({f"ics/{name}/grad_shift": shift, f"ics/{name}/grad_cos": cos})
        log_scalars(trainer, metrics, step)
        self.record(metrics, step)

    def ics_summary(self) -> dict[str, dict[str, float]]:
        """Per layer: mean grad_shift and mean grad_cos over the measured steps."""
        return grad_shift_summary(self.series())
