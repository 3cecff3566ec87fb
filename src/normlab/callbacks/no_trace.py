"""Leave no trace: what a probe or an extra pass changes in a model (train/eval modes, buffers such
as BN's running statistics, the random number generators) is put back on exit.

One home for the ICS probe and grad-shift measurement (`measure`), the loss-landscape probe
(`landscape`) and PreciseBN's extra passes (`precise_bn`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def rng_untouched(device: torch.device) -> Iterator[list[torch.device]]:
    """On exit: the CPU generator, and `device`'s when it is a GPU, as they were (dropout and noisy
    BN draw random numbers in extra passes). Yields the CUDA devices forked."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield devices


def rng_rewinder(devices: Sequence[torch.device]) -> Callable[[], None]:
    """A `rewind()` that sets the generators (CPU and `devices`) back to where they are now: every
    call after it draws the same random numbers (same dropout masks)."""
    cpu_state = torch.get_rng_state()
    gpu_states = [torch.cuda.get_rng_state(d) for d in devices]

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        for device, state in zip(devices, gpu_states, strict=True):
            torch.cuda.set_rng_state(state, device)

    return rewind


def set_modes(modules: Sequence[nn.Module], modes: Sequence[bool]) -> None:
    """Set each module's train/eval flag to its mode, module by module and only where it differs
    (`Module.train` walks every submodule again)."""
    for module, training in zip(modules, modes, strict=True):
        if module.training is not training:
            module.training = training


class Untouched:
    """`untouched` for a model probed again and again (the dense ICS probe): its modules and
    buffers are looked up once, here; `with keeper():` puts every module's train/eval mode, every
    buffer and the random number generators back on exit. Yields (device, the CUDA devices
    forked). Build a new one for a model whose modules change."""

    def __init__(self, model: nn.Module) -> None:
        # a list, not a dict: torchmetrics' Metric hashes its whole state (the LightningModule's
        # metrics are modules too), which made this line cost more than the probe's forward pass
        self.modules = list(model.modules())
        self.buffer_owners = [
            (m, name) for m in self.modules for name, b in m._buffers.items() if b is not None
        ]
        self.device = next(model.parameters()).device

    @contextmanager
    def __call__(self) -> Iterator[tuple[torch.device, list[torch.device]]]:
        modes = [module.training for module in self.modules]
        saved = [m._buffers[name].detach().clone() for m, name in self.buffer_owners]
        try:
            with rng_untouched(self.device) as devices:
                yield self.device, devices
        finally:
            set_modes(self.modules, modes)
            with torch.no_grad():
                for (m, name), value in zip(self.buffer_owners, saved, strict=True):
                    m._buffers[name].copy_(value)  # the buffer now, even if one was replaced


@contextmanager
def untouched(model: nn.Module) -> Iterator[tuple[torch.device, list[torch.device]]]:
    """On exit: every module's train/eval mode, every buffer (BN running statistics) and the
    random number generators as they were. Yields (device, the CUDA devices forked)."""
    with Untouched(model)() as devices:
        yield devices
