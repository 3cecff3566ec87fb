"""Datasets by name, each loaded once into float tensors (no per-sample PIL conversion).

`digits` ships inside scikit-learn and needs no files. The torchvision datasets read their real
on-disk files from `root` (downloading them only when asked); when the files are missing the
error says which files and where to put them; a file that is there but broken is named with
what is wrong with it (`normlab.data.checks`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from normlab.data import checks

Split = tuple[torch.Tensor, torch.Tensor]  # (inputs float32 (N, C, H, W), labels int64 (N,))


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split


@dataclass(frozen=True)
class DatasetInfo:
    input_shape: tuple[int, ...]
    num_classes: int
    load: Callable[[Path, bool], Splits]


class DatasetMissingError(RuntimeError):
    """The dataset's files are not on disk and could not be downloaded."""


def _standardize(splits: Splits) -> Splits:
    """Scale every split with the per-channel mean/std of the training inputs."""
    x_train = splits.train[0]
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)

    def scale(split: Split) -> Split:
        return ((split[0] - mean) / std).contiguous(), split[1]

    return Splits(scale(splits.train), scale(splits.val), scale(splits.test))


def _hold_out(x: torch.Tensor, y: torch.Tensor, n_val: int) -> tuple[Split, Split]:
    """The last `n_val` training samples become the validation split (fixed, seed-independent)."""
    return (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])


@functools.cache
def _sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 images (N, 1, 8, 8) in [0, 1] and labels, parsed once per process (every job
    of a sweep in one process would otherwise re-read scikit-learn's CSV)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(bunch.target, dtype=torch.int64)


def load_digits(root: Path, download: bool) -> Splits:
    """scikit-learn's 1,797 8x8 digits, split 1,197 / 300 / 300 by a fixed permutation."""
    x, y = (t.clone() for t in _sklearn_digits())
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train, val, test = (x[:1197], y[:1197]), (x[1197:1497], y[1197:1497]), (x[1497:], y[1497:])
    return _standardize(Splits(train, val, test))


def _torchvision_dataset(class_name: str, root: Path, train: bool, download: bool):
    datasets = importlib.import_module("torchvision.datasets")
    dataset_class = getattr(datasets, class_name)
    try:
        return dataset_class(str(root), train=train, download=download)
    except Exception as error:  # torchvision raises RuntimeError, or URLError when offline
        raise DatasetMissingError(_missing_message(dataset_class, root, download)) from error


def _dataset_files(dataset_class: type, root: Path) -> tuple[Path, list[str]]:
    """(folder, file names) torchvision reads for `dataset_class`."""
    if hasattr(dataset_class, "resources"):  # MNIST family: IDX files (.gz copies are extracted)
        folder = root / dataset_class.__name__ / "raw"
        return folder, [Path(url).name.removesuffix(".gz") for url, _ in dataset_class.resources]
    folder = root / dataset_class.base_folder  # CIFAR: the extracted python pickle batches
    files = [name for name, _ in dataset_class.train_list + dataset_class.test_list]
    return folder, [*files, dataset_class.meta["filename"]]


def _check_files(class_name: str, root: Path) -> None:
    """Name each missing or broken file before torchvision reads (or misreads) them."""
    dataset_class = getattr(importlib.import_module("torchvision.datasets"), class_name)
    folder, files = _dataset_files(dataset_class, root)
    missing = checks.missing_files(folder, files)
    if missing:
        raise DatasetMissingError(_missing_message(dataset_class, root, False, missing))
    if hasattr(dataset_class, "resources"):
        for prefix in ("train", "t10k"):
            checks.check_idx_split(folder, prefix)
    else:
        listed = dataset_class.train_list + dataset_class.test_list
        meta = dataset_class.meta
        checks.check_checksums(folder, [*listed, (meta["filename"], meta["md5"])], class_name)


def _missing_message(
    dataset_class: type, root: Path, download: bool, files: list[str] | None = None
) -> str:
    folder, all_files = _dataset_files(dataset_class, root)
    files = files or all_files
    tried = "download failed (no network?); " if download else ""
    return (
        f"{dataset_class.__name__} files not found: {tried}put {', '.join(files)} into {folder} "
        f"(copy them from a machine with internet; set paths.data_dir=... to point elsewhere, "
        f"or data.download=true where there is network)"
    )


def _gunzip_copied_files(raw_folder: Path) -> None:
    """torchvision reads only extracted IDX files; accept the .gz files people usually copy."""
    from torchvision.datasets.utils import extract_archive

    for archive in raw_folder.glob("*.gz"):
        if not archive.with_suffix("").exists():
            extract_archive(str(archive), str(raw_folder))


def _load_mnist_like(class_name: str) -> Callable[[Path, bool], Splits]:
    def load(root: Path, download: bool) -> Splits:
        _gunzip_copied_files(root / class_name / "raw")
        if not download:
            _check_files(class_name, root)
        train_set = _torchvision_dataset(class_name, root, True, download)
        test_set = _torchvision_dataset(class_name, root, False, download)
        x = train_set.data.unsqueeze(1).float() / 255.0
        train, val = _hold_out(x, train_set.targets.long(), n_val=min(5000, len(x) // 6))
        test = (test_set.data.unsqueeze(1).float() / 255.0, test_set.targets.long())
        return _standardize(Splits(train, val, test))

    return load


def load_cifar10(root: Path, download: bool) -> Splits:
    if not download:
        _check_files("CIFAR10", root)
    train_set = _torchvision_dataset("CIFAR10", root, True, download)
    test_set = _torchvision_dataset("CIFAR10", root, False, download)

    def tensors(dataset) -> Split:  # numpy (N, H, W, C) uint8 -> (N, C, H, W) float
        x = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.tensor(dataset.targets, dtype=torch.int64)

    x, y = tensors(train_set)
    train, val = _hold_out(x, y, n_val=min(5000, len(x) // 6))
    return _standardize(Splits(train, val, tensors(test_set)))


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo((1, 8, 8), 10, load_digits),
    "mnist": DatasetInfo((1, 28, 28), 10, _load_mnist_like("MNIST")),
    "fashion_mnist": DatasetInfo((1, 28, 28), 10, _load_mnist_like("FashionMNIST")),
    "cifar10": DatasetInfo((3, 32, 32), 10, load_cifar10),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"data={name!r} is not valid; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]
