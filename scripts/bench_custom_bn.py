"""normlab's BatchNorm against torch's: time (forward + backward) and memory kept for backward.

Everything is measured side by side in one process on the same tensors, training mode:

* ``custom_bn_time_1d`` -- BatchNorm1d on (256, 512); ``custom_bn_time_2d`` -- BatchNorm2d on
  (64, 32, 32, 32). Ratio normlab / torch of the time of one forward + backward (gradients of
  input, weight and bias). The two are timed in short alternating blocks; the ratio is the
  median of the ratios of neighbouring blocks, so a neighbour process that slows the machine
  down affects both sides alike.
* ``custom_bn_saved_bytes`` -- ratio normlab / torch of the bytes that autograd keeps for the
  backward of one training forward (the larger of the 1d and 2d ratios), counted with
  ``torch.autograd.graph.saved_tensors_hooks``; a storage saved twice is counted once.

Informative extras: absolute milliseconds and per-shape byte ratios; with ``--compiled`` also
the ratio of our layer under ``torch.compile``. Threads: whatever torch uses
(``OMP_NUM_THREADS``), or ``--threads``.

    OMP_NUM_THREADS=1 python scripts/bench_custom_bn.py [--quick] [--threads N] [--compiled]

``scripts/bench.py`` imports this file and merges ``measure()`` into its own results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import normlab.nn as ours

CASES = {
    "1d": ((256, 512), nn.BatchNorm1d, ours.BatchNorm1d),
    "2d": ((64, 32, 32, 32), nn.BatchNorm2d, ours.BatchNorm2d),
}


def saved_tensor_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of ``module(x)`` (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        seen[key] = max(seen.get(key, 0), tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(seen.values())


def _pair(shape: tuple[int, ...], torch_cls: type[nn.Module], our_cls: type[nn.Module]):
    """Both layers with the same random gamma and beta, plus an input and an output gradient."""
    generator = torch.Generator().manual_seed(0)
    reference = torch_cls(shape[1])
    with torch.no_grad():
        reference.weight.copy_(torch.rand(shape[1], generator=generator) + 0.5)
        reference.bias.copy_(torch.randn(shape[1], generator=generator))
    custom = our_cls(shape[1])
    custom.load_state_dict(reference.state_dict())
    x = (torch.randn(shape, generator=generator) * 2 + 1).requires_grad_()
    grad_out = torch.randn(shape, generator=generator)
    return reference, custom, x, grad_out


def _step_fn(
    module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, owner: nn.Module | None = None
) -> Callable[[], None]:
    owner = module if owner is None else owner  # a compiled wrapper's parameters are owner's
    inputs = (x, owner.weight, owner.bias)

    def step() -> None:
        # autograd.grad, not .backward(): no gradient accumulation into .grad in the timing.
        torch.autograd.grad(module(x), inputs, grad_out)

    return step


def _time_ratio(
    reference: Callable[[], None], custom: Callable[[], None], budget_s: float
) -> tuple[float, float, float]:
    """Median per-pair ratio custom/reference, and the median seconds per call of each.

    Many short blocks (~10 ms), alternating sides: on a shared machine the load changes from
    one moment to the next, and only the ratio of two blocks run back to back is trustworthy.
    """
    for fn in (reference, custom, reference, custom):  # warm-up (allocator, caches)
        fn()
    start = time.perf_counter()
    reference()
    custom()
    pair = time.perf_counter() - start
    calls = max(1, int(0.02 / pair))  # ~10 ms per block and side
    repeats = max(5, int(budget_s / (calls * pair)))

    def block(fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    ratios, reference_times, custom_times = [], [], []
    for repeat in range(repeats):
        # Alternate who goes first so that a slow drift of the machine cancels out.
        if repeat % 2 == 0:
            t_ref, t_custom = block(reference), block(custom)
        else:
            t_custom, t_ref = block(custom), block(reference)
        ratios.append(t_custom / t_ref)
        reference_times.append(t_ref)
        custom_times.append(t_custom)
    return (
        statistics.median(ratios),
        statistics.median(reference_times),
        statistics.median(custom_times),
    )


def measure(
    quick: bool = False, threads: int | None = None, compiled: bool = False
) -> dict[str, float]:
    """The ``custom_bn_*`` benchmark keys (see the module docstring).

    ``compiled=True`` adds ``custom_bn_time_{1d,2d}_compiled``: our layer under
    ``torch.compile`` against plain torch. Off by default -- compiling takes a minute on a
    small CPU machine -- and never part of the headline keys.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    budget_s = 1.5 if quick else 5.0  # seconds of timing per shape
    results: dict[str, float] = {}
    byte_ratios = []
    try:
        for name, (shape, torch_cls, our_cls) in CASES.items():
            reference, custom, x, grad_out = _pair(shape, torch_cls, our_cls)
            ratio, t_ref, t_custom = _time_ratio(
                _step_fn(reference, x, grad_out), _step_fn(custom, x, grad_out), budget_s
            )
            results[f"custom_bn_time_{name}"] = round(ratio, 3)
            if compiled and not quick:
                compiled_custom = torch.compile(custom)
                compiled_ratio, _, _ = _time_ratio(
                    _step_fn(reference, x, grad_out),
                    _step_fn(compiled_custom, x, grad_out, custom),
                    budget_s,
                )
                results[f"custom_bn_time_{name}_compiled"] = round(compiled_ratio, 3)
            results[f"custom_bn_ms_{name}"] = round(t_custom * 1e3, 3)
            results[f"torch_bn_ms_{name}"] = round(t_ref * 1e3, 3)

            byte_ratio = saved_tensor_bytes(custom, x) / saved_tensor_bytes(reference, x)
            results[f"custom_bn_saved_bytes_{name}"] = round(byte_ratio, 6)
            byte_ratios.append(byte_ratio)
        results["custom_bn_saved_bytes"] = round(max(byte_ratios), 6)
        results["custom_bn_threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 20 s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile (slow)")
    args = parser.parse_args()
    results = measure(quick=args.quick, threads=args.threads, compiled=args.compiled)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
