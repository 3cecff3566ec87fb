"""What the ICS callbacks measure, as plain functions of a model and a batch.

- `distribution_stats`: the BN paper's percentiles (p15/p50/p85), mean and std of a tensor.
- `probe_batch` / `probe_activations`: a fixed batch of held-out inputs, and the input of every
  nonlinearity on it (the distribution internal covariate shift is about); `ActivationProbe`
  keeps what that needs from the model, for a probe that runs every few steps.
- `grad_norm`: the L2 norm of a layer's gradient.
- `grad_shift`: gradient-based ICS (Santurkar et al. 2018, "How does batch normalization help
  optimization?", Definition 2.1). For weight layer i: G = dL/dW_i at the current weights;
  G' = the same gradient, on the same batch, after the optimizer has updated only the layers
  *before* i (their real update: the real optimizer with its state, fed G's counterparts for those
  layers). Reported: ||G - G'||_2 and cos(G, G'). Layer 1 has nothing before it: 0 and 1 by
  definition (logged, but left out of the dashboard). "Before layer i" means every parameter
  registered before W_i (the backbones register in forward order), so the norm layers' affine
  parameters of earlier blocks move too. The measurement leaves no trace: parameters, optimizer
  state, `.grad`, BN running statistics, train/eval mode and the random number generators are
  restored exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from normlab.callbacks.no_trace import Untouched, rng_rewinder, set_modes, untouched

# ---------------------------------------------------------------- distribution statistics

PERCENTILES = {"p15": 0.15, "p50": 0.50, "p85": 0.85}
# torch.quantile refuses inputs above 2**24 elements.
QUANTILE_LIMIT = 2**24


def flat_sample(x: torch.Tensor, limit: int = QUANTILE_LIMIT) -> torch.Tensor:
    """All values as float32, or an evenly strided subset of at most `limit` of them."""
    flat = x.detach().reshape(-1).float()
    stride = -(-flat.numel() // limit)
    return flat[::stride] if stride > 1 else flat


def distribution_stats(x: torch.Tensor, limit: int = QUANTILE_LIMIT) -> dict[str, float]:
    """`{"p15", "p50", "p85", "mean", "std"}` of all values of `x` (percentiles on a sample)."""
    flat = x.detach().reshape(-1).float()
    sample = flat_sample(flat, limit)
    std, mean = torch.std_mean(flat)
    if sample.device.type == "cpu" and sample.numel() > 0:
        mean_std = torch.stack([mean, std]).tolist()
        percentiles = _quantiles(sample.numpy())
    else:
        q = torch.tensor(list(PERCENTILES.values()), dtype=sample.dtype, device=sample.device)
        values = torch.cat([torch.quantile(sample, q), mean[None], std[None]]).tolist()  # one sync
        percentiles, mean_std = values[:-2], values[-2:]
    if math.isnan(mean_std[0]):  # a NaN anywhere: NaN percentiles, as torch.quantile says
        percentiles = [math.nan] * len(PERCENTILES)
    return dict(zip([*PERCENTILES, "mean", "std"], [*percentiles, *mean_std], strict=True))


def _quantiles(values: np.ndarray) -> list[float]:
    """torch.quantile's percentiles (linear interpolation between the neighbouring order
    statistics) from numpy's sort: a dense probe asks for them for every layer every few steps,
    and numpy's vectorized sort is cheaper than torch's sort and than its own partition at six
    ranks."""
    positions = [q * (values.size - 1) for q in PERCENTILES.values()]
    below = [math.floor(p) for p in positions]
    above = [math.ceil(p) for p in positions]
    ordered = np.sort(values)
    return [
        float(ordered[lo] + (ordered[hi] - ordered[lo]) * np.float32(p - lo))
        for p, lo, hi in zip(positions, below, above, strict=True)
    ]


# ---------------------------------------------------------------- the probe batch


PROBE_MODES = ("batch", "eval")


def check_probe_mode(mode: str) -> str:
    """`mode` if it is a probe mode, else ValueError naming the valid ones."""
    if mode not in PROBE_MODES:
        valid = ", ".join(PROBE_MODES)
        raise ValueError(f"probe_mode={mode!r} is not valid; choose one of: {valid}")
    return mode


@contextmanager
def capture(
    modules: dict[str, nn.Module], what: str = "input"
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input (or output) of each module during the `with` body: `{name: tensor}`."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        captured[name] = tensor.detach()

    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: keep(name, args[0]))
        if what == "input"
        else module.register_forward_hook(lambda _m, _args, out, name=name: keep(name, out))
        for name, module in modules.items()
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def probe_batch(trainer: pl.Trainer, size: int) -> torch.Tensor:
    """The first `size` validation inputs (training inputs when there is no validation data)."""
    datamodule = trainer.datamodule
    loader = datamodule.val_dataloader() if datamodule is not None else None
    if loader is not None:
        return next(iter(loader))[0][:size]
    x, _ = next(iter(trainer.train_dataloader)).flat()  # training batches are MiniBatchStacks
    return x[:size]


def probe_activations(
    model: nn.Module, x: torch.Tensor, mode: str = "batch"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(input of every nonlinearity, output of every norm layer) on the probe batch `x`: one
    `ActivationProbe` run once."""
    return ActivationProbe(model, x, mode)()


def probe_modes(modules: Sequence[nn.Module], batch: bool = True) -> list[bool]:
    """Each module's mode in a probe: train (norms on the batch's own statistics) when `batch`,
    else eval (running statistics); dropout off either way."""
    dropout = nn.modules.dropout._DropoutNd
    return [batch and not isinstance(m, dropout) for m in modules]


class ActivationProbe:
    """`probe()`: (input of every nonlinearity, output of every norm layer) of `model` on the
    fixed batch `x`.

    `mode="batch"` normalizes as training does, with the probe batch's own statistics, and
    changes nothing: running statistics are restored, dropout is off and the random number
    generators are rewound. `mode="eval"` runs the model in eval mode: BN uses its running
    statistics, which at step 0 are the initial (0, 1) and later lag the batch statistics.

    What the probe needs from the model (its modules and buffers -- `no_trace.Untouched` --, which
    are dropout, the nonlinearities and norms) is looked up once, here: a dense probe runs every
    few steps, and on a small model walking the module tree and setting every module's mode cost
    more than the forward pass. Build a new probe for a model whose modules change.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, mode: str = "batch") -> None:
        batch = check_probe_mode(mode) == "batch"
        self.model = model
        self.no_trace = Untouched(model)
        self.x = x.to(self.no_trace.device)
        self.probe_modes = probe_modes(self.no_trace.modules, batch)
        self.nonlinearities = model.nonlinearities()
        self.norms = model.norm_layers() if hasattr(model, "norm_layers") else {}  # none: {}

    @torch.no_grad()  # no autograd graph: same values, a fraction of the cost
    def __call__(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with (
            self.no_trace(),
            capture(self.nonlinearities) as preact,
            capture(self.norms, what="output") as norm_out,
        ):
            set_modes(self.no_trace.modules, self.probe_modes)
            self.model(self.x)
        return preact, norm_out


# ---------------------------------------------------------------- gradients


def grad_norm(layer: nn.Module, read: bool = True) -> float | torch.Tensor | None:
    """L2 norm of the gradient of all the layer's parameters (weight and bias); None without one.
    `read=False`: the 0-d tensor, not yet read back (one read for many layers is cheaper)."""
    grads = [p.grad.detach().reshape(-1) for p in layer.parameters() if p.grad is not None]
    if not grads:
        return None
    norm = torch.cat(grads).norm()
    return norm.item() if read else norm


def trained_weight(layer: nn.Module) -> torch.Tensor:
    """The parameter that training updates for `layer.weight`: the weight itself, or under a
    torch parametrization (``weights=standardized|weight_norm``) the raw tensor behind it
    (``original``; weight norm's direction ``v``, ``original1``)."""
    if parametrize.is_parametrized(layer, "weight"):
        originals = layer.parametrizations.weight
        return originals.original if hasattr(originals, "original") else originals.original1
    return layer.weight


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
            if i == 0:  # nothing before the first layer moves: 0 and 1 by definition
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
    with untouched(model) as (_, devices):
        rewind = rng_rewinder(devices)
        try:
            for p in params:
                p.grad = None
            model.train()
            yield rewind
        finally:
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
