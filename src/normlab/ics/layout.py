"""TensorBoard custom-scalars dashboard: per layer, the p15/p50/p85 band of its input.

Custom scalars overlay every selected run, so `tensorboard --logdir <sweep dir>` shows the bands
of `norm=none` and `norm=bn` side by side in one chart per layer.
"""

from __future__ import annotations

import lightning.pytorch as pl

from normlab.ics.sinks import tensorboard_writers

Layout = dict[str, dict[str, list]]


def ics_layout(layers: list[str]) -> Layout:
    """Margin charts (value p50, band p15..p85) per layer; grad shift and grad norms per layer."""
    return {
        "ICS: input of each nonlinearity (p50, band p15-p85)": {
            layer: ["Margin", [f"ics/{layer}/p50", f"ics/{layer}/p15", f"ics/{layer}/p85"]]
            for layer in layers
        },
        "ICS: gradient shift ||G - G'|| (Santurkar et al. 2018)": {
            "grad_shift": ["Multiline", [r"ics/.*/grad_shift"]],
            "grad_cos": ["Multiline", [r"ics/.*/grad_cos"]],
        },
        "Gradient norms": {"grads": ["Multiline", [r"grads/.*/norm"]]},
    }


def write_layout(trainer: pl.Trainer, layers: list[str]) -> None:
    """Add the dashboard to every TensorBoard logger of the trainer (rank 0 only)."""
    if trainer.is_global_zero:
        for writer in tensorboard_writers(trainer):
            writer.add_custom_scalars(ics_layout(layers))
