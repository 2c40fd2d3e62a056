"""Read insightface ``train.rec`` + ``train.idx`` without mxnet.

The format is MXNet's RecordIO: each record is ``magic (u32 0xced7230a) | lrecord (u32: top 3 bits
continuation flag, low 29 bits length) | payload | zero padding to 4 bytes``. An image payload starts
with an ``IRHeader`` (u32 flag, f32 label, u64 id, u64 id2); when flag > 0, ``flag`` float32 labels
follow and the first is the class. Then the JPEG bytes. In insightface's packing, record 0 is a
header whose labels give the range of image records ``[1, label[0])``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_HEADER = struct.Struct("<IfQQ")


class RecordIOError(ValueError):
    pass


@dataclass(frozen=True)
class ImageRecord:
    label: float
    labels: tuple[float, ...]
    id: int
    image: bytes


def read_index(idx_path: str | Path) -> list[tuple[int, int]]:
    """(record index, byte offset) pairs from a ``.idx`` text file, sorted by index."""
    out = []
    for n, line in enumerate(Path(idx_path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise RecordIOError(f"{idx_path}:{n}: expected 'index<TAB>offset', got {line!r}")
        out.append((int(parts[0]), int(parts[1])))
    return sorted(out)


def read_record(fh: BinaryIO, offset: int) -> bytes:
    """The payload of the record starting at ``offset``, joining continuation parts.

    dmlc's writer splits a payload at each 4-byte-aligned occurrence of the magic and drops those
    4 bytes, so (as dmlc's ``RecordIOReader::NextRecord`` does) the magic goes back between parts.
    Each part is read padded to 4 bytes and cut to its length, also as dmlc does.
    """
    fh.seek(offset)
    parts = []
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise RecordIOError(f"truncated record header at offset {offset}")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"bad magic {magic:#x} at offset {offset}")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        upper = (length + 3) & ~3
        data = fh.read(upper)
        if len(data) < upper:
            raise RecordIOError(f"truncated record payload at offset {offset}")
        parts.append(data[:length])
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)


def unpack_image(payload: bytes) -> ImageRecord:
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError("record shorter than its IRHeader")
    flag, label, rid, _ = _IR_HEADER.unpack_from(payload)
    pos = _IR_HEADER.size
    labels: tuple[float, ...] = (label,)
    if flag > 0:
        end = pos + 4 * flag
        if len(payload) < end:
            raise RecordIOError("record shorter than its label array")
        labels = struct.unpack_from(f"<{flag}f", payload, pos)
        pos = end
    return ImageRecord(label=labels[0], labels=labels, id=rid, image=payload[pos:])


def image_record_offsets(rec_path: str | Path, idx_path: str | Path) -> list[tuple[int, int]]:
    """(record index, offset) of the image records, skipping insightface's header records."""
    index = read_index(idx_path)
    if not index:
        return []
    with open(rec_path, "rb") as fh:
        first = unpack_image(read_record(fh, index[0][1]))
    if index[0][0] == 0 and len(first.labels) >= 2 and not first.image:
        last = int(first.labels[0])  # images are records [1, last); identity records follow
        return [(i, off) for i, off in index if 1 <= i < last]
    return index
