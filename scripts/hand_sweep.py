"""The 12-job digits sweep written by hand: the for-loop a researcher would write instead of
`python train.py -m norm=none,bn activation=relu,sigmoid seed=0,1,2`.

    python scripts/hand_sweep.py OUT_DIR [--probe-every N]

Same work as normlab's default job: scikit-learn's digits split 1,197 / 300 / 300 (fixed
permutation, standardized), the MLP 64-32-32-10 (Linear -> BatchNorm1d -> activation, or no norm),
default Adam lr 0.01, batch 32, 10 epochs (370 optimizer steps), validation after every epoch, a
test at the end, and every `--probe-every` optimizer steps the p15/p50/p85/mean/std of each
nonlinearity's input on a fixed 256-sample probe batch (batch statistics, running statistics
untouched). Each job writes OUT_DIR/<job>.json with its final numbers and its optimizer-step time
(`step_seconds`: forward, backward and update only). One process, imports included in its wall
time: `scripts/bench_sweep.py` compares it with the real command line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

QUANTILES = torch.tensor([0.15, 0.50, 0.85])


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).reshape(-1, 64) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    mean, std = x[:1197].mean(), x[:1197].std()
    x = (x - mean) / std
    return (x[:1197], y[:1197]), (x[1197:1497], y[1197:1497]), (x[1497:], y[1497:])


def mlp(norm: str, activation: str) -> nn.Sequential:
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
    layers: list[nn.Module] = []
    for fan_in, fan_out in ((64, 32), (32, 32)):
        layers.append(nn.Linear(fan_in, fan_out))
        if norm == "bn":
            layers.append(nn.BatchNorm1d(fan_out))
        layers.append(act())
    return nn.Sequential(*layers, nn.Linear(32, 10))


def probe(model: nn.Sequential, x: torch.Tensor) -> dict[str, float]:
    """Percentiles of each nonlinearity's input, batch statistics, running stats restored."""
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batch" in k}
    stats, h, layer = {}, x, 0
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.ReLU | nn.Sigmoid):
                layer += 1
                q = torch.quantile(h.reshape(-1), QUANTILES).tolist()
                std, mean = torch.std_mean(h)
                for p, v in zip((15, 50, 85), q, strict=True):
                    stats[f"layer{layer}/p{p}"] = v
                stats.update({f"layer{layer}/mean": mean.item(), f"layer{layer}/std": std.item()})
            h = module(h)
    model.load_state_dict(saved, strict=False)
    return stats


def evaluate(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(split[0])
        loss = nn.functional.cross_entropy(logits, split[1]).item()
        acc = (logits.argmax(1) == split[1]).float().mean().item()
    model.train()
    return loss, acc


def job(norm: str, activation: str, seed: int, data, probe_every: int) -> dict:
    (x, y), val, test = data
    torch.manual_seed(seed)
    model = mlp(norm, activation)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    probe_x = x[:256]
    record: dict = {"probes": {}, "val": []}
    step, step_seconds, started = 0, 0.0, time.perf_counter()
    for epoch in range(10):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y) - 31, 32):
            if step % probe_every == 0:
                record["probes"][step] = probe(model, probe_x)
            index = order[start : start + 32]
            tick = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step_seconds += time.perf_counter() - tick
            step += 1
        record["val"].append(evaluate(model, val))
    record["probes"][step] = probe(model, probe_x)
    record["test"] = evaluate(model, test)
    record.update(steps=step, step_seconds=step_seconds, seconds=time.perf_counter() - started)
    return record


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    probe_every = int(argv[argv.index("--probe-every") + 1]) if "--probe-every" in argv else 10
    data = digits()
    for norm in ("none", "bn"):
        for activation in ("relu", "sigmoid"):
            for seed in (0, 1, 2):
                record = job(norm, activation, seed, data, probe_every)
                name = f"{norm}-{activation}-{seed}.json"
                (out / name).write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
