"""Dataset files checked one by one before they are read: each problem is one line naming the
file and what is wrong with it (missing, wrong magic number, wrong size, counts that disagree,
checksum of another file).

torchvision trusts the MNIST-family IDX files (600 images with 500 labels train on misaligned
pairs) and reports a bad one as "not found"; for CIFAR it checks every file and names none.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

from normlab.config.errors import ConfigError

IMAGES_MAGIC = 0x00000803  # IDX: 0, 0, type 0x08 (unsigned byte), 3 dimensions
LABELS_MAGIC = 0x00000801  # 1 dimension


class DatasetFileError(RuntimeError):
    """A dataset file is there but is not what it should be."""


def missing_files(folder: Path, names: list[str]) -> list[str]:
    return [name for name in names if not (folder / name).is_file()]


def check_idx_split(folder: Path, prefix: str) -> int:
    """`<prefix>-images-idx3-ubyte` and `<prefix>-labels-idx1-ubyte` are sound and agree;
    return their number of samples."""
    images = folder / f"{prefix}-images-idx3-ubyte"
    labels = folder / f"{prefix}-labels-idx1-ubyte"
    n_images, rows, cols = _idx_header(images, IMAGES_MAGIC, dims=3)
    (n_labels,) = _idx_header(labels, LABELS_MAGIC, dims=1)
    _check_size(images, 16 + n_images * rows * cols, f"{n_images} images of {rows}x{cols}")
    _check_size(labels, 8 + n_labels, f"{n_labels} labels")
    if n_images != n_labels:
        raise DatasetFileError(
            f"{labels} holds {n_labels} labels but {images.name} holds {n_images} images: "
            f"each image needs exactly one label (mixed-up or truncated files?)"
        )
    return n_images


def _idx_header(path: Path, magic: int, dims: int) -> tuple[int, ...]:
    size = 4 + 4 * dims
    with open(path, "rb") as handle:
        header = handle.read(size)
    if len(header) < size:
        raise DatasetFileError(f"{path}: {len(header)} bytes, too short for an IDX header")
    (found,) = struct.unpack(">I", header[:4])
    if found != magic:
        raise DatasetFileError(
            f"{path}: magic number {found:#010x}, expected {magic:#010x} "
            f"(not an IDX {'image' if dims == 3 else 'label'} file, or still compressed?)"
        )
    return struct.unpack(f">{dims}I", header[4:])


def _check_size(path: Path, expected: int, holds: str) -> None:
    actual = path.stat().st_size
    if actual != expected:
        raise DatasetFileError(
            f"{path}: {actual} bytes, but its header announces {holds} = {expected} bytes "
            f"({'truncated' if actual < expected else 'trailing data'})"
        )


def check_checksums(folder: Path, files: list[tuple[str, str]], release: str) -> None:
    """Each (name, md5) file in `folder` has the release's checksum."""
    for name, md5 in files:
        path = folder / name
        digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
        if digest != md5:
            raise DatasetFileError(
                f"{path}: not the {release} release file (md5 {digest}, expected {md5}; "
                f"{path.stat().st_size} bytes: truncated or corrupt?)"
            )


# ---------------------------------------------------------------- data that cannot train
class BadDataError(ConfigError):
    """Loaded data that cannot train (or would train on garbage): refused before training, in
    one line naming the dataset's files or the config key; the command line exits 2."""


def check_splits(splits: Any, *, where: str, num_classes: int, batch_size: int) -> None:
    """Refuse data that cannot train: a split without samples, inputs and labels of different
    counts, labels outside 0..num_classes-1, inputs that are NaN/inf after standardization
    (e.g. a constant training set: its std is 0), a training batch larger than the training set
    (0 optimizer steps per epoch). `where`: the files or `data.name=...` to name."""
    import torch

    for split in ("train", "val", "test"):
        x, y = getattr(splits, split)
        if len(y) == 0 or len(x) != len(y):
            raise BadDataError(
                f"{where}: the {split} split holds {len(x)} inputs and {len(y)} labels "
                f"(each input needs exactly one label, and a split cannot be empty)"
            )
        bad = (y < 0) | (y >= num_classes)
        if bool(bad.any()):
            raise BadDataError(
                f"{where}: {int(bad.sum())} {split} label(s) outside the {num_classes} classes "
                f"0..{num_classes - 1} (e.g. {int(y[bad][0])}): wrong files or data.name?"
            )
        finite = torch.isfinite(x.flatten(1)).all(dim=1)
        if not bool(finite.all()):
            raise BadDataError(
                f"{where}: {int((~finite).sum())} {split} input(s) hold NaN or inf after "
                f"standardization (a constant training set has std 0; or corrupt values)"
            )
    n_train = len(splits.train[1])
    if batch_size > n_train:
        raise BadDataError(
            f"data.batch_size={batch_size} is larger than the training set of {where} "
            f"({n_train} samples): no optimizer step would run; lower data.batch_size"
        )
