import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.data.batches import MiniBatchStack, TensorBatches
from normlab.data.datamodule import NormLabDataModule
from normlab.data.registry import DatasetMissingError, dataset_info, load_digits


def test_digits_fixed_split_standardized():
    splits = load_digits(Path("unused"), download=False)
    assert [len(s[1]) for s in (splits.train, splits.val, splits.test)] == [1197, 300, 300]
    assert splits.train[0].shape[1:] == (1, 8, 8) and splits.train[0].dtype == torch.float32
    assert splits.train[0].mean().abs() < 1e-5 and (splits.train[0].std() - 1).abs() < 1e-3
    again = load_digits(Path("unused"), download=False)
    assert torch.equal(splits.test[0], again.test[0])  # independent of any run seed


def batches(n=100, bs=8, **kw):
    x = torch.arange(n, dtype=torch.float32).view(n, 1)
    return TensorBatches(x, torch.arange(n), bs, train=True, **kw)


def order_of(loader, epoch):
    loader.set_epoch(epoch)
    return torch.cat([stack.flat()[1] for stack in loader])


def test_order_depends_only_on_seed_and_epoch():
    a, b = batches(seed=1), batches(seed=1)
    assert torch.equal(order_of(a, 3), order_of(b, 3))
    assert not torch.equal(order_of(a, 0), order_of(a, 1))
    assert not torch.equal(order_of(a, 0), order_of(batches(seed=2), 0))
    assert sorted(order_of(a, 0).tolist()) != list(range(96))  # shuffled...
    assert len(set(order_of(a, 0).tolist())) == 96  # ...without repeats, last partial dropped


def test_grouped_steps_give_the_same_minibatches():
    single, grouped = batches(steps_per_batch=1), batches(steps_per_batch=5)
    singles = [y for stack in single for _, y in stack.minibatches()]
    stacks = list(grouped)
    assert len(grouped) == 3 and [len(s) for s in stacks] == [5, 5, 2]
    assert all(s.x.shape == (5, 8, 1) for s in stacks[:2])
    assert torch.equal(torch.stack(singles), torch.cat([s.y for s in stacks]))
    assert grouped.steps_per_epoch == 12  # 100 samples, batches of 8, last partial dropped


def test_minibatch_stack_views():
    x, y = torch.randn(3, 4, 2, 5), torch.arange(12).view(3, 4)
    stack = MiniBatchStack(x, y)
    assert len(stack) == 3
    steps = list(stack.minibatches())
    assert len(steps) == 3
    for k, (xk, yk) in enumerate(steps):
        assert torch.equal(xk, x[k]) and torch.equal(yk, y[k])
    assert all(torch.equal(a, b) for a, b in zip(stack.first(), (x[0], y[0]), strict=True))
    flat_x, flat_y = stack.flat()
    assert flat_x.shape == (12, 2, 5) and flat_y.tolist() == list(range(12))


def test_lightning_moves_a_minibatch_stack_to_the_device():
    from lightning.fabric.utilities.apply_func import move_data_to_device

    stack = MiniBatchStack(torch.randn(2, 3, 4), torch.arange(6).view(2, 3))
    moved = move_data_to_device(stack, torch.device("meta"))
    assert isinstance(moved, MiniBatchStack)
    assert moved.x.device.type == moved.y.device.type == "meta"
    assert moved.x.shape == (2, 3, 4) and moved.y.dtype == torch.int64
    assert stack.x.device.type == "cpu"  # a new stack, the original untouched


def test_ddp_ranks_split_every_global_batch():
    ranks = [batches(seed=4, rank=r, world_size=2) for r in range(2)]
    full = [stack.first()[1] for stack in batches(seed=4)]
    for step, (a, b) in enumerate(zip(*ranks, strict=True)):
        together = torch.cat([a.first()[1], b.first()[1]])
        assert sorted(together.tolist()) == sorted(full[step].tolist())


def test_eval_batches_cover_everything_in_order():
    loader = TensorBatches(torch.zeros(10, 2), torch.arange(10), 4, train=False)
    assert [y.tolist() for _, y in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(loader) == 3


def write_idx(path: Path, array: np.ndarray) -> None:
    """The MNIST IDX format: magic (0, 0, dtype=0x08 ubyte, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fake_mnist(
    root: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 30
) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_family_loads_real_idx_files(tmp_path, name, folder):
    make_fake_mnist(tmp_path, folder)
    splits = dataset_info(name).load(tmp_path, False)
    assert [len(s[1]) for s in (splits.train, splits.val, splits.test)] == [100, 20, 30]
    assert splits.train[0].shape[1:] == (1, 28, 28)
    assert splits.test[1].tolist() == [i % 10 for i in range(30)]


def test_missing_mnist_says_which_files_and_where(tmp_path):
    with pytest.raises(DatasetMissingError) as info:
        dataset_info("mnist").load(tmp_path, False)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "MNIST" / "raw") in message and "\n" not in message


def test_missing_cifar_names_its_batches(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"data_batch_1.*test_batch.*cifar-10-batches-py"):
        dataset_info("cifar10").load(tmp_path, False)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="data='foo' is not valid; choose one of: digits, mnist"):
        NormLabDataModule(name="foo")


def write_raw_mnist(raw: Path, n_images: int = 30, n_labels: int = 30) -> None:
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        header = struct.pack(">IIII", 2051, n_images, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + bytes(n_images * 784))
        labels = struct.pack(">II", 2049, n_labels) + bytes(i % 10 for i in range(n_labels))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("count", r"train-labels-idx1-ubyte holds 25 labels but train-images-idx3-ubyte holds 30"),
        ("magic", r"t10k-images-idx3-ubyte: magic number 0x00000801, expected 0x00000803"),
        ("truncate", r"train-images-idx3-ubyte: 10000 bytes, but its header announces 30 images"),
    ],
)
def test_broken_idx_files_are_named_with_what_is_wrong(tmp_path, damage, message):
    from normlab.data.checks import DatasetFileError

    raw = tmp_path / "MNIST" / "raw"
    write_raw_mnist(raw)
    if damage == "count":
        (raw / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 25) + bytes(25))
    elif damage == "magic":
        path = raw / "t10k-images-idx3-ubyte"
        path.write_bytes(struct.pack(">I", 2049) + path.read_bytes()[4:])
    else:
        path = raw / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:10000])
    with pytest.raises(DatasetFileError, match=message) as info:
        dataset_info("mnist").load(tmp_path, False)
    assert "\n" not in str(info.value)


def write_cifar(folder: Path) -> None:
    import pickle

    from torchvision.datasets import CIFAR10

    folder.mkdir(parents=True)
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))


def test_cifar_folder_missing_one_batch_names_only_that_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetMissingError) as info:
        dataset_info("cifar10").load(tmp_path, False)
    message = str(info.value)
    assert "put data_batch_3 into" in message and "data_batch_1" not in message


def test_cifar_batch_that_is_not_the_release_file_is_named(tmp_path):
    from normlab.data.checks import DatasetFileError

    write_cifar(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DatasetFileError, match=r"data_batch_1: not the CIFAR10 release file"):
        dataset_info("cifar10").load(tmp_path, False)
