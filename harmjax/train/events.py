"""A dependency-free TensorBoard scalar writer (and reader, for checks).

An event file is a TFRecord stream: each record is
    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
(little-endian), where data is a serialized `tensorboard.Event` protobuf. Only the fields
scalars need are encoded by hand:
    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }
TensorBoard reads files named `events.out.tfevents.<time>.<host>` in the log directory.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping

_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1  # CRC-32C (Castagnoli), reflected
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (table-driven)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """A serialized Event holding `scalars` (tag -> value) or a file_version header."""
    out = bytes([1 << 3 | 1]) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(int(step))
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + bytes([2 << 3 | 5]) + struct.pack("<f", float(v)))
            for tag, v in scalars.items()
        )
        out += _field_bytes(5, summary)
    return out


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, data, the data's masked CRC."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventWriter:
    """Appends scalar events to a new TensorBoard event file in `logdir` (flushed per write)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}")
        self._f = open(self.path, "ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        self._f.write(frame_record(data))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes one event with a scalar per (tag, value) at `step`."""
        self._write(encode_event(time.time(), step, scalars=values))

    def close(self) -> None:
        """Closes the file."""
        self._f.close()


# ------------------------------------------------------------------------------ reading


def read_records(path: str) -> Iterator[bytes]:
    """The data of each TFRecord in `path`, checking both CRCs (ValueError on a bad one)."""
    with open(path, "rb") as f:
        blob = f.read()
    pos = 0
    while pos < len(blob):
        header = blob[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", blob[pos + 8 : pos + 12])
        data = blob[pos + 12 : pos + 12 + length]
        (dcrc,) = struct.unpack("<I", blob[pos + 12 + length : pos + 16 + length])
        if hcrc != masked_crc32c(header) or dcrc != masked_crc32c(data):
            raise ValueError(f"{path}: bad CRC in the record at byte {pos}.")
        yield data
        pos += 16 + length


def _parse(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message."""
    pos = 0

    def varint():
        nonlocal pos
        shift = result = 0
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            yield number, wire, buf[pos : pos + 8]
            pos += 8
        elif wire == 5:
            yield number, wire, buf[pos : pos + 4]
            pos += 4
        elif wire == 2:
            n = varint()
            yield number, wire, buf[pos : pos + n]
            pos += n
        else:
            raise ValueError(f"Unsupported protobuf wire type {wire}.")


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file, in order."""
    out = []
    for record in read_records(path):
        step, values = 0, []
        for number, _, value in _parse(record):
            if number == 2:
                step = value
            elif number == 5:
                for _, _, v in _parse(value):
                    fields = {n: x for n, _, x in _parse(v)}
                    values.append((fields[1].decode(), struct.unpack("<f", fields[2])[0]))
        out.extend((step, tag, val) for tag, val in values)
    return out
