"""TensorBoard's record checksum in C.

Every record of an event file carries a masked CRC-32C of its header and of its data. Without
TensorFlow installed, TensorBoard computes it in pure Python, byte by byte, both when writing
(`tensorboard.summary.writer.record_writer`) and when reading back
(`tensorboard.compat.tensorflow_stub.pywrap_tensorflow`). A dense ICS probe writes an event every
few steps and a sweep's summary reads every job's files, so `use_native_crc32c()` puts the C
implementation of google-crc32c in TensorBoard's place (tensorboardX does the same with the
`crc32c` package). The files are the same byte for byte.
"""

from __future__ import annotations

import functools

try:
    import google_crc32c
except ImportError:  # an environment without it keeps TensorBoard's own checksum
    google_crc32c = None

_MASK_DELTA = 0xA282EAD8  # TFRecord's mask: rotate right by 15 bits, add this constant


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data` (what TensorBoard's own `masked_crc32c` returns)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


@functools.cache
def use_native_crc32c() -> None:
    """Make TensorBoard's event writer and reader use `masked_crc32c` (once per process; a no-op
    where google-crc32c has no C extension)."""
    if google_crc32c is None or google_crc32c.implementation != "c":
        return
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    pywrap_tensorflow.masked_crc32c = masked_crc32c
    record_writer.masked_crc32c = masked_crc32c
