"""normlab.results.checksums: TensorBoard's record checksum computed in C gives TensorBoard's
numbers, and event files written with it pass TensorBoard's own (pure Python) check."""

from __future__ import annotations

import struct

import pytest
import torch
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub
from tensorboard.summary.writer import record_writer
from torch.utils.tensorboard import SummaryWriter

from normlab.results.checksums import masked_crc32c, use_native_crc32c


def tensorboards_masked_crc32c(data: bytes) -> int:
    """TensorBoard's pure Python checksum (its CRC-32C, masked as its `masked_crc32c` does)."""
    crc = stub.u32(stub.crc32c(data))
    return stub.u32(((crc >> 15) | stub.u32(crc << 17)) + 0xA282EAD8)


@pytest.mark.parametrize("data", [b"", b"a", b"123456789", bytes(range(256)) * 7])
def test_checksum_equals_tensorboards(data):
    assert masked_crc32c(data) == tensorboards_masked_crc32c(data)


def test_event_files_written_with_it_pass_tensorboards_check(tmp_path):
    use_native_crc32c()
    assert record_writer.masked_crc32c is masked_crc32c
    assert stub.masked_crc32c is masked_crc32c  # the reader too
    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(5):
            writer.add_scalar("loss", 1.0 / (step + 1), step)
            writer.add_histogram("w", torch.tensor([0.1 * step, 1.0, 2.0]), step)
    (events,) = tmp_path.glob("events.out.tfevents.*")
    data, records = events.read_bytes(), 0
    while data:
        header, header_crc = data[:8], struct.unpack("<I", data[8:12])[0]
        length = struct.unpack("<Q", header)[0]
        body = data[12 : 12 + length]
        body_crc = struct.unpack("<I", data[12 + length : 16 + length])[0]
        assert header_crc == tensorboards_masked_crc32c(header)
        assert body_crc == tensorboards_masked_crc32c(body)
        data, records = data[16 + length :], records + 1
    assert records == 11  # the file version record, 5 scalars, 5 histograms
