"""Depth probes: vanishing / exploding gradients and rank collapse, layer by layer.

On a fixed probe batch (the first 256 validation samples, with their labels), with the norms
normalizing as in training (batch statistics, like the ICS probe's default) and dropout off, one
forward and backward pass gives per layer (``layer1``, ``layer2``, ... in forward order, then
``head`` for the gradients):

- ``gradprofile/<layer>/norm``: ||dL/dW_l||, the L2 norm of the cross-entropy gradient of the
  layer's weight tensor (`weight_layers()`: a block's Linear/Conv; a ResNet block's first conv);
  ``gradprofile/<layer>/rel``: ||dL/dW_l|| / ||W_l||. Falling towards the input is vanishing,
  growing towards the input exploding.
- ``scale/<layer>/std``: the standard deviation of the block's output.
- ``rank/<layer>/stable_rank``: ||H||_F^2 / ||H||_2^2 of the block's output H (one row per
  sample, flattened); ``rank/<layer>/cosine``: the mean cosine similarity between two different
  samples' rows. Rank collapse (Daneshmand et al. 2020) is cosine -> 1, stable rank -> 1.

The measurement leaves no trace (`no_trace.untouched`: modes, BN running statistics and the
random number generators restored; gradients by `torch.autograd.grad`, never into ``.grad``):
training is bit-identical with and without it. `DepthProbe` measures at step 0, every
`every_n_steps` optimizer steps and at the end; `depth_summary()` gives `metrics.json` its
``"depth"`` entry (``grad_norm_init``, ``stable_rank_init``, ``cosine_init``, ... per layer).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from normlab.callbacks.ics import RecordingCallback, StepCadence, log_scalars
from normlab.callbacks.measure import capture, probe_modes
from normlab.callbacks.no_trace import Untouched, set_modes
from normlab.results.dashboard import Layout
from normlab.results.runs import Series, layers_with

PREFIXES = ("gradprofile/", "scale/", "rank/")
# metrics.json name -> tag (`<prefix>/<layer>/<stat>`)
SUMMARY_KEYS = {
    "grad_norm": ("gradprofile", "norm"),
    "grad_rel": ("gradprofile", "rel"),
    "scale_std": ("scale", "std"),
    "stable_rank": ("rank", "stable_rank"),
    "cosine": ("rank", "cosine"),
}

# ---------------------------------------------------------------- the numbers


def stable_rank(h: torch.Tensor) -> float:
    """||H||_F^2 / ||H||_2^2 of `h` flattened to one row per sample (1 for a rank-one matrix, the
    rank for one with equal singular values); 0 for a zero matrix."""
    h = h.detach().reshape(h.shape[0], -1).double()
    gram = h @ h.T if h.shape[0] <= h.shape[1] else h.T @ h
    if not torch.isfinite(gram).all():  # a diverged run: no spectrum to speak of
        return float("nan")
    eigenvalues = torch.linalg.eigvalsh(gram)  # squared singular values, ascending
    top = eigenvalues[-1].item()
    return gram.trace().item() / top if top > 0 else 0.0


def mean_cosine(h: torch.Tensor) -> float:
    """Mean cosine similarity between the rows of `h` (one per sample, flattened) over all pairs
    of different samples; rows of zeros count as similarity 0."""
    h = h.detach().reshape(h.shape[0], -1).double()
    n = h.shape[0]
    if n < 2:
        return float("nan")
    unit = F.normalize(h, dim=1)
    total = unit.sum(dim=0)
    pairs = total.dot(total) - unit.pow(2).sum()  # sum over i != j of <u_i, u_j>
    return (pairs / (n * (n - 1))).item()


def probe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose outputs are the layers' representations: a backbone's `blocks`
    (`layer1`, ...), else (a user's backbone without them) its nonlinearities."""
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Module) and len(list(blocks.named_children())) > 0:
        return dict(blocks.named_children())
    return dict(model.nonlinearities())


@contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """Train mode (norms on batch statistics), dropout off, and no trace left."""
    keeper = Untouched(model)
    with keeper():
        set_modes(keeper.modules, probe_modes(keeper.modules))
        yield


def depth_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """All the depth scalars (`gradprofile/...`, `scale/...`, `rank/...`) of `model` on (x, y)."""
    weights = {
        name: layer.weight for name, layer in model.weight_layers().items()
        if isinstance(getattr(layer, "weight", None), torch.Tensor) and layer.weight.requires_grad
    }
    device = next(model.parameters()).device
    blocks = probe_blocks(model)
    with (
        _batch_statistics(model),
        capture(blocks, what="output") as outputs,
        torch.enable_grad(),
    ):
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    metrics: dict[str, float] = {}
    for (name, weight), grad in zip(weights.items(), grads, strict=True):
        g = 0.0 if grad is None else grad.detach().double().norm().item()
        w = weight.detach().double().norm().item()
        metrics[f"gradprofile/{name}/norm"] = g
        metrics[f"gradprofile/{name}/rel"] = g / w if w > 0 else float("inf")
    for name, h in outputs.items():
        metrics[f"scale/{name}/std"] = h.double().std().item()
        metrics[f"rank/{name}/stable_rank"] = stable_rank(h)
        metrics[f"rank/{name}/cosine"] = mean_cosine(h)
    return metrics


def probe_labeled_batch(trainer: pl.Trainer, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `size` validation samples with their labels (training ones without validation
    data): the same inputs as the ICS probe's."""
    datamodule = trainer.datamodule
    loader = datamodule.val_dataloader() if datamodule is not None else None
    if loader is not None:
        x, y = next(iter(loader))[:2]
    else:
        x, y = next(iter(trainer.train_dataloader)).flat()
    return x[:size], y[:size]


def depth_summary(series: Series) -> dict[str, dict[str, float]]:
    """Per layer, `<name>_init` (first measured step) and `<name>_end` (last) of each number."""
    summary: dict[str, dict[str, float]] = {}
    for name, (prefix, stat) in SUMMARY_KEYS.items():
        for layer in layers_with(series, stat, prefix=prefix):
            points = series[f"{prefix}/{layer}/{stat}"]
            steps = sorted(points)
            numbers = summary.setdefault(layer, {})
            numbers[f"{name}_init"] = points[steps[0]]
            numbers[f"{name}_end"] = points[steps[-1]]
    return summary


# ---------------------------------------------------------------- the callback


class DepthProbe(RecordingCallback):
    """Gradient profile, block output scale and representation rank on a fixed probe batch, at
    step 0, every `every_n_steps` optimizer steps (before the update) and at the end of training.

    One measurement is one forward/backward pass on the probe batch (256 samples: about eight
    training steps of batch 32) plus a 256 x 256 eigenvalue problem per layer; at the default
    cadence that is a few per cent of a default run (scripts/bench.py, depth_probe_overhead).
    """

    prefix = "gradprofile/"

    def __init__(
        self,
        every_n_steps: int = 1000,
        probe_size: int = 256,
        output_dir: str | Path | None = None,
    ) -> None:
        super().__init__(output_dir)
        self.cadence = StepCadence(every_n_steps)
        self.probe_size = probe_size
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_step: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.probe = probe_labeled_batch(trainer, self.probe_size)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.cadence.due(trainer.global_step):
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last_step != trainer.global_step:  # the trained model too
            self.measure(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self.probe is None:
            return
        metrics = depth_probe(pl_module, *self.probe)
        log_scalars(trainer, metrics, step)
        self.record(metrics, step)
        self.last_step = step

    def series(self) -> Series:
        if self.history or self.output_dir is None or not self.output_dir.exists():
            return self.history
        from normlab.results.runs import read_scalars

        series: Series = {}
        for prefix in PREFIXES:
            series.update(read_scalars(self.output_dir, prefix=prefix))
        return series

    def depth_summary(self) -> dict[str, dict[str, float]]:
        """`metrics.json` ``"depth"``: per layer, each number at step 0 (`_init`) and the end."""
        return depth_summary(self.series())

    def layout_section(self, layers: list[str]) -> Layout:
        """TensorBoard custom scalars: the gradient profile, output scale and rank per layer."""
        return {
            "Depth: gradient norm ||dL/dW|| per layer (vanishing / exploding)": {
                "gradient norm": ["Multiline", [r"gradprofile/.*/norm"]],
                "relative gradient norm": ["Multiline", [r"gradprofile/.*/rel"]],
                "block output std": ["Multiline", [r"scale/.*/std"]],
            },
            "Depth: representation rank (rank collapse)": {
                "stable rank": ["Multiline", [r"rank/.*/stable_rank"]],
                "mean cosine between samples": ["Multiline", [r"rank/.*/cosine"]],
            },
        }

