"""normlab's benchmark: every figure a ratio of two things measured side by side in this process.

    python scripts/bench.py --json out.json [--quick]

Keys (see design.md): epoch_vs_seed_loop (lecture-style DataLoader loop / normlab, >1 = normlab
faster), step_vs_raw_torch (normlab / plain loop over pre-made tensors with default Adam, <1 =
normlab faster), the same two for the CNN (`*_cnn`), custom_bn_* (our BatchNorm / torch's),
ics_logging_overhead (epoch with the ICS callbacks / without), norm_step_time
(`{"mlp": {norm: epoch time with that norm / with norm=none}, "cnn": {...}}`), step_vs_raw_torch_vgg
and landscape_overhead (vgg_small with BN on 8x8 digits: normlab / plain loop, and normlab with the
landscape probe at its default cadence / without); step_vs_raw_torch_resnet (ResNet-20 with BN on
8x8 digits: normlab / plain loop) and depth_probe_overhead (default run: epoch with the depth probe
at its default cadence / without); sweep_vs_hand_loop, job_overhead_seconds and
default_sweep_seconds (scripts/bench_sweep.py: the real command line in fresh processes against
the hand-written loop of scripts/hand_sweep.py, wall time).

Data is MNIST-shaped (N x 1 x 28 x 28 uint8, made in memory; the real files when present under
data/MNIST/raw). Each contender runs whole epochs, alternating rounds with the others; its figure
is its fastest epoch after a warm-up (load from other processes only ever adds time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
LR = 0.01


def mnist_shaped(n: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 28, 28) and labels: the real MNIST training files when present."""
    raw = ROOT / "data" / "MNIST" / "raw"
    if (raw / "train-images-idx3-ubyte").exists():
        from torchvision.datasets import MNIST

        dataset = MNIST(str(ROOT / "data"), train=True)
        return dataset.data[:n].numpy(), dataset.targets[:n].numpy()
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def lecture_model(kind: str) -> nn.Module:
    """The lab-09 MLP 784-32-32-10 with BN (Linear -> BN -> ReLU), or a small BN CNN."""
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


class PerSampleDataset(torch.utils.data.Dataset):
    """What torchvision's MNIST + ToTensor do per sample: uint8 -> PIL image -> float tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.to_tensor = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.to_tensor(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def seed_loop_epoch(kind: str, images: np.ndarray, labels: np.ndarray) -> Callable[[], None]:
    """The lecture's loop: DataLoader(shuffle, drop_last) over per-sample conversion + Adam."""
    model = lecture_model(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(
        PerSampleDataset(images, labels), batch_size=BATCH, shuffle=True, drop_last=True
    )

    def epoch() -> None:
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return epoch


def raw_loop_epoch(kind: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A careful hand-written loop: pre-made tensors, a permutation, slices, default Adam."""
    return plain_loop_epoch(lecture_model(kind), x, y)


def plain_loop_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One epoch of `model` on pre-made tensors: a permutation, slices, default Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def epoch() -> None:
        model.train()
        order = torch.randperm(len(y))
        for start in range(0, len(y) - BATCH + 1, BATCH):
            index = order[start : start + BATCH]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return epoch


class NormlabEpochs:
    """normlab's real training path (composed config, Trainer, callbacks, logger), one epoch a call.

    Trainer.fit runs in a generator that pauses at every epoch end, so its epochs interleave
    with the other contenders' and each is timed on its own.
    """

    def __init__(
        self,
        kind: str,
        x: torch.Tensor,
        y: torch.Tensor,
        out: Path,
        *overrides: str,
        norm: str = "bn",
        probe_samples: int = 64,
    ):
        from hydra import compose, initialize_config_dir
        from hydra.utils import instantiate

        from normlab.config import CONFIG_DIR
        from normlab.data.datamodule import NormLabDataModule
        from normlab.data.registry import Splits
        from normlab.models.from_config import check_components
        from normlab.train import build_module, build_trainer

        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    f"model={kind}",
                    f"norm={norm}",
                    f"lr={LR}",
                    f"data.batch_size={BATCH}",
                    f"paths.output_dir={out}",
                    "data=mnist",  # MNIST-shaped: the splits below replace its files
                    "paths.data_dir=unused",
                    "trainer.max_epochs=1000",
                    "+trainer.limit_val_batches=0",
                    *overrides,
                ],
            )
        check_components(cfg, BATCH, BATCH)  # a norm that refuses this model: ConfigError
        torch.manual_seed(0)
        self.datamodule = instantiate(cfg.data)
        assert isinstance(self.datamodule, NormLabDataModule)
        few = (x[:probe_samples], y[:probe_samples])  # validation: the probes' batch
        self.datamodule.splits = Splits((x, y), few, few)  # bypass the registry: bench data
        self.module = build_module(cfg, self.datamodule)
        self.pause = _PauseEachEpoch()
        self.trainer, _ = build_trainer(cfg, [self.pause])
        self.run = self._fit()

    def _fit(self):
        self.thread = threading.Thread(
            target=self.trainer.fit,
            args=(self.module,),
            kwargs={"datamodule": self.datamodule},
            daemon=True,
        )
        self.thread.start()
        while True:
            self.pause.epoch_done.wait()
            self.pause.epoch_done.clear()
            yield
            self.pause.go_on.set()

    def epoch(self) -> None:
        next(self.run)

    def stop(self) -> None:
        self.trainer.should_stop = True
        self.pause.go_on.set()
        if hasattr(self, "thread"):
            self.thread.join(timeout=60)


class _PauseEachEpoch(pl.Callback):
    """Blocks the training thread at each epoch end until the benchmark asks for the next one."""

    def __init__(self) -> None:
        self.epoch_done, self.go_on = threading.Event(), threading.Event()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_done.set()
        self.go_on.wait()
        self.go_on.clear()


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def race(contenders: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Fastest epoch of each contender (other processes only ever add time); round 0 warms up."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(rounds + 1):
        names = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
        for name in names:
            start = clock()
            contenders[name]()
            if round_:
                times[name].append(clock() - start)
    return {name: min(t) for name, t in times.items()}


def training_figures(kind: str, n: int, rounds: int, out: Path) -> dict[str, float]:
    images, labels = mnist_shaped(n)
    x = (torch.from_numpy(images).float().div(255).unsqueeze(1) - 0.1307) / 0.3081
    y = torch.from_numpy(labels).long()
    normlab = NormlabEpochs(kind, x, y, out / kind)
    try:
        seconds = race(
            {
                "seed_loop": seed_loop_epoch(kind, images, labels),
                "raw_torch": raw_loop_epoch(kind, x, y),
                "normlab": normlab.epoch,
            },
            rounds,
        )
    finally:
        normlab.stop()
    suffix = "" if kind == "mlp" else "_cnn"
    return {
        f"epoch_vs_seed_loop{suffix}": seconds["seed_loop"] / seconds["normlab"],
        f"step_vs_raw_torch{suffix}": seconds["normlab"] / seconds["raw_torch"],
        f"epoch_seconds{suffix}": {k: round(v, 4) for k, v in seconds.items()},
    }


def norm_step_times(kind: str, n: int, rounds: int, out: Path) -> dict[str, float]:
    """Per norm choice: normlab's epoch time with that norm / with norm=none (same data)."""
    from normlab.config import CONFIG_DIR, ConfigError
    from normlab.config.validate import group_choices

    images, labels = mnist_shaped(n)
    x = (torch.from_numpy(images).float().div(255).unsqueeze(1) - 0.1307) / 0.3081
    y = torch.from_numpy(labels).long()
    runs = {}
    try:
        for norm in group_choices(CONFIG_DIR, "norm"):
            # Nine paused trainers at once: their progress bars would fight over the terminal.
            quiet = ("~callbacks.progress_bar", "trainer.enable_progress_bar=false")
            try:
                runs[norm] = NormlabEpochs(kind, x, y, out / f"{kind}-{norm}", *quiet, norm=norm)
            except ConfigError:  # e.g. Instance Norm on the MLP: it refuses, nothing to time
                continue
        seconds = race({norm: run.epoch for norm, run in runs.items()}, rounds)
    finally:
        for run in runs.values():
            run.stop()
    return {norm: round(seconds[norm] / seconds["none"], 3) for norm in runs}


def digits_tiled(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n standardized 8x8 digits (the 1,797 of scikit-learn, repeated): the santurkar_* data."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(bunch.target, dtype=torch.int64)
    repeat = -(-n // len(y))
    return x.repeat(repeat, 1, 1, 1)[:n].contiguous(), y.repeat(repeat)[:n].contiguous()


def raw_vgg_epoch(x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The plain loop of `raw_loop_epoch` on the very VGG normlab builds (vgg_small, BN)."""
    from normlab.models.vgg import VGG
    from normlab.nn import TorchBatchNorm

    torch.manual_seed(0)
    model = VGG(tuple(x.shape[1:]), 10, preset="vgg_small", norm=TorchBatchNorm)
    return plain_loop_epoch(model, x, y)


def vgg_figures(quick: bool, out: Path) -> dict[str, float]:
    """step_vs_raw_torch_vgg (normlab / plain loop) and landscape_overhead (normlab with the
    landscape probe at its default cadence / without), vgg_small with BN on 8x8 digits."""
    # epochs of 200 or 400 steps: each holds the same number of probes (every 100 steps)
    x, y = digits_tiled(BATCH * (200 if quick else 400))
    # NormlabEpochs' MNIST config with digits' shape; two fits in threads: no live progress bars
    digits = (
        "data.name=digits", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false"
    )
    plain = NormlabEpochs("vgg", x, y, out / "vgg", *digits)
    probed = NormlabEpochs("vgg", x, y, out / "vgg_landscape", *digits, "callbacks=landscape")
    try:
        seconds = race(
            {"raw_torch": raw_vgg_epoch(x, y), "normlab": plain.epoch, "landscape": probed.epoch},
            5 if quick else 9,
        )
    finally:
        plain.stop()
        probed.stop()
    return {
        "step_vs_raw_torch_vgg": seconds["normlab"] / seconds["raw_torch"],
        "landscape_overhead": seconds["landscape"] / seconds["normlab"],
        "epoch_seconds_vgg": {k: round(v, 4) for k, v in seconds.items()},
    }


def raw_resnet_epoch(x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The plain loop of `raw_loop_epoch` on the very ResNet-20 normlab builds (BN)."""
    from normlab.models.resnet import ResNet
    from normlab.nn import TorchBatchNorm

    torch.manual_seed(0)
    model = ResNet(tuple(x.shape[1:]), 10, preset="resnet20", norm=TorchBatchNorm)
    return plain_loop_epoch(model, x, y)


def resnet_figures(quick: bool, out: Path) -> dict[str, float]:
    """step_vs_raw_torch_resnet: ResNet-20 with BN on 8x8 digits, normlab / plain loop."""
    x, y = digits_tiled(BATCH * (40 if quick else 200))
    digits = (
        "data.name=digits", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
        "model.preset=resnet20",
    )
    plain = NormlabEpochs("resnet", x, y, out / "resnet", *digits)
    try:
        seconds = race({"raw_torch": raw_resnet_epoch(x, y), "normlab": plain.epoch},
                       3 if quick else 6)
    finally:
        plain.stop()
    return {
        "step_vs_raw_torch_resnet": seconds["normlab"] / seconds["raw_torch"],
        "epoch_seconds_resnet": {k: round(v, 4) for k, v in seconds.items()},
    }


def depth_probe_figures(quick: bool, out: Path) -> dict[str, float]:
    """depth_probe_overhead: epoch of the default run (MLP with BN, default callbacks) with the
    depth probe at its default cadence / without it. Epochs are exactly one cadence long (1,000
    optimizer steps), so every epoch holds one measurement on a 256-sample probe batch."""
    from omegaconf import OmegaConf

    every = OmegaConf.load(ROOT / "conf" / "callbacks" / "default.yaml").depth.every_n_steps
    images, labels = mnist_shaped(BATCH * every)
    x = (torch.from_numpy(images).float().div(255).unsqueeze(1) - 0.1307) / 0.3081
    y = torch.from_numpy(labels).long()
    common = ("callbacks.progress_bar=null", "trainer.enable_progress_bar=false")
    plain = NormlabEpochs("mlp", x, y, out / "no_depth", *common, "callbacks.depth=null",
                          probe_samples=256)
    probed = NormlabEpochs("mlp", x, y, out / "depth", *common, probe_samples=256)
    try:
        seconds = race({"plain": plain.epoch, "depth": probed.epoch}, 3 if quick else 5)
    finally:
        plain.stop()
        probed.stop()
    return {
        "depth_probe_overhead": seconds["depth"] / seconds["plain"],
        "epoch_seconds_depth_probe": {k: round(v, 4) for k, v in seconds.items()},
    }


def custom_bn_figures(quick: bool) -> dict[str, float]:
    import bench_custom_bn  # beside this file: scripts/ is on sys.path when run as a script

    return bench_custom_bn.measure(quick=quick)


def sweep_figures(quick: bool) -> dict[str, float]:
    """sweep_vs_hand_loop, job_overhead_seconds, default_sweep_seconds (scripts/bench_sweep.py)."""
    import bench_sweep  # beside this file, like bench_custom_bn

    return bench_sweep.sweep_figures(quick=quick)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="small data, few rounds (< 60 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="cpu",
        help="cpu: this process's CPU time (steady on a shared machine; default); wall: wall time",
    )
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    n, rounds = (8000, 5) if args.quick else (60000, 5)
    figures: dict = {
        "samples": n,
        "batch_size": BATCH,
        "threads": args.threads,
        "clock": args.clock,
    }
    with tempfile.TemporaryDirectory(prefix="normlab-bench-") as tmp:
        figures.update(training_figures("mlp", n, rounds, Path(tmp)))
        figures.update(training_figures("cnn", n // 4 if args.quick else n // 2, 2, Path(tmp)))
        figures["norm_step_time"] = {
            "mlp": norm_step_times("mlp", n // 4 if args.quick else n // 2, 3, Path(tmp)),
            "cnn": norm_step_times("cnn", n // 16 if args.quick else n // 8, 3, Path(tmp)),
        }
        figures.update(vgg_figures(args.quick, Path(tmp)))
        figures.update(resnet_figures(args.quick, Path(tmp)))
        figures.update(depth_probe_figures(args.quick, Path(tmp)))
    figures.update(custom_bn_figures(args.quick))
    from bench_ics import logging_overhead  # beside this file, like bench_custom_bn

    figures["ics_logging_overhead"] = logging_overhead(quick=args.quick)
    figures.update(sweep_figures(args.quick))
    figures["bench_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
