"""Write files so that a reader sees the old content or the new one, never a torn one.

The temporary file lies beside the target (same directory, hence the same filesystem), so the
final `os.replace` is an atomic rename; on any error the temporary file is removed and the
target is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

FULL_BELOW = 1 << 20  # bytes free after a failed write: the disk is full


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """`with atomic_open(p) as f: f.write(...)`: `p` appears only once everything is on disk."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(target.parent).free if target.parent.is_dir() else None
        if isinstance(error, Exception) and free is not None and free < FULL_BELOW:
            # torch.save reports a full disk as "unexpected pos ..." without errno
            raise OSError(
                errno.ENOSPC, f"no space left on the device ({free} bytes free); {target} unchanged"
            ) from error
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace `path` with `data` atomically; return `path`."""
    with atomic_open(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str], save: Callable | None = None) -> None:
    """`torch.save(obj, path)`, atomically."""
    import torch

    with atomic_open(path) as handle:
        (save or torch.save)(obj, handle)
