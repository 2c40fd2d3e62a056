"""Read and write insightface ``train.rec`` + ``train.idx`` without mxnet.

The format is MXNet's RecordIO: each record is ``magic (u32 0xced7230a) | lrecord (u32: top 3 bits
continuation flag, low 29 bits length) | payload | zero padding to 4 bytes``. An image payload starts
with an ``IRHeader`` (u32 flag, f32 label, u64 id, u64 id2); when flag > 0, ``flag`` float32 labels
follow and the first is the class. Then the JPEG bytes. In insightface's packing, record 0 is a
header whose labels give the range of image records ``[1, label[0])``.

The writer exists so simulated and converted training sets are real insightface files (what users
bring), written byte for byte as dmlc-core would, streaming any number of images.
"""
from __future__ import annotations

import operator
import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_HEADER = struct.Struct("<IfQQ")
_MAX_LENGTH = 1 << 29  # lrecord keeps 29 bits of length; dmlc refuses records of 2^29 bytes or more
_MAX_EXACT_FLOAT = 1 << 24  # labels and record indices are float32: exact only up to 2^24


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


def read_label(fh: BinaryIO, offset: int) -> float:
    """The class label of the image record at ``offset``, from its IRHeader only.

    Listing a multi-million-image .rec must not read every JPEG: this reads the 8-byte record head,
    the 24-byte IRHeader and (when flag > 0) the first label, ~36 bytes. Only when dmlc split the
    record inside those bytes (an aligned magic in the header) does it read the whole record. The
    image payload is not checked here (its truncation shows when the image is read).
    """
    fh.seek(offset)
    head = fh.read(8 + _IR_HEADER.size)
    if len(head) < 8:
        raise RecordIOError(f"truncated record header at offset {offset}")
    magic, lrec = struct.unpack_from("<II", head)
    if magic != MAGIC:
        raise RecordIOError(f"bad magic {magic:#x} at offset {offset}")
    cflag, length = lrec >> 29, lrec & (_MAX_LENGTH - 1)
    if cflag in (2, 3):
        raise RecordIOError(f"offset {offset} is a continuation part (cflag {cflag}), not a record start")
    if length < _IR_HEADER.size:
        if cflag == 1:  # split inside the IRHeader: the parts must be joined
            return unpack_image(read_record(fh, offset)).label
        raise RecordIOError(f"record at offset {offset} shorter than its IRHeader")
    if len(head) < 8 + _IR_HEADER.size:
        raise RecordIOError(f"truncated record payload at offset {offset}")
    flag, label, _, _ = _IR_HEADER.unpack_from(head, 8)
    if flag == 0:
        return label
    if length < _IR_HEADER.size + 4 * flag:
        if cflag == 1:  # split inside the label array
            return unpack_image(read_record(fh, offset)).label
        raise RecordIOError(f"record at offset {offset} shorter than its label array")
    first = fh.read(4)
    if len(first) < 4:
        raise RecordIOError(f"truncated record payload at offset {offset}")
    return struct.unpack("<f", first)[0]


def encode_record(payload: bytes) -> bytes:
    """One record exactly as dmlc-core's ``RecordIOWriter::WriteRecord`` writes it.

    Each 4-byte-aligned occurrence of the magic inside the payload ends a part and is dropped (the
    reader puts it back); cflag 1 = first part, 2 = middle, 3 = last, 0 = a whole record; zero
    padding to 4 bytes after the last part only (the middle parts are aligned already).
    """
    n = len(payload)
    if n >= _MAX_LENGTH:
        raise RecordIOError(f"RecordIO only accepts records under 2^29 bytes, got {n}")
    out, dptr, pos = [], 0, payload.find(_MAGIC_BYTES)
    while pos >= 0:  # find() instead of a 4-byte loop: the same splits, at C speed
        if pos % 4:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
            continue
        out += [_MAGIC_BYTES, struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (pos - dptr)),
                payload[dptr:pos]]
        dptr = pos + 4
        pos = payload.find(_MAGIC_BYTES, dptr)
    out += [_MAGIC_BYTES, struct.pack("<I", ((3 if dptr else 0) << 29) | (n - dptr)), payload[dptr:],
            bytes(-n % 4)]
    return b"".join(out)


def pack_image(label: float, rid: int, image: bytes, labels: tuple[float, ...] = ()) -> bytes:
    """An IRHeader payload as mxnet's ``recordio.pack``: with ``labels``, flag = their count, the
    header label 0 and the labels as float32 after the header."""
    flag = len(labels)
    head = _IR_HEADER.pack(flag, 0.0 if flag else label, rid, 0)
    return head + (struct.pack(f"<{flag}f", *labels) if flag else b"") + bytes(image)


def _check_exact(value: int, what: str) -> None:
    if value > _MAX_EXACT_FLOAT:
        raise RecordIOError(f"{what} {value} is over 2^24: float32 labels would not hold it exactly")


def _class_of(label, n: int) -> int:
    try:
        value = operator.index(label)  # ints and numpy ints; not floats
    except TypeError:
        value = -1
    if isinstance(label, bool) or value < 0:
        raise RecordIOError(f"image {n}: class must be an int >= 0, got {label!r}")
    return value


def write_insightface_rec(folder: str | Path, images: Iterable[tuple[int, bytes]],
                          image_size: tuple[int, int] = (112, 112)) -> dict:
    """Write ``train.rec``, ``train.idx`` and ``property`` in insightface's layout, streaming.

    Record 0 is a header (labels: first identity record, end), then one record per image (label =
    class, id = record index), then one record per identity (labels: [start, end) of its images).
    ``images`` are (class, JPEG bytes) and may be a generator of millions: records and offsets go to disk as
    they come and one int per identity stays in memory, so they must come sorted by class (the
    identity ranges need each class contiguous). The files appear only when complete.
    Returns {"images": n, "classes": k}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = ("train.rec", "train.idx", "property")
    tmp = {name: folder / f".{name}.tmp" for name in names}
    starts, last = array("q"), -1  # first image record of each identity; the previous class
    try:
        with open(tmp["train.rec"], "wb") as rec, open(tmp["train.idx"], "w", newline="\n") as idx:
            # The header's byte size is fixed (positive float labels never form the magic), so a
            # placeholder now, the real counts at the end.
            header = encode_record(pack_image(0, 0, b"", (0.0, 0.0)))
            rec.write(header)
            idx.write("0\t0\n")
            offset, n = len(header), 0
            for label, image in images:
                label = _class_of(label, n)
                if label < last:
                    raise RecordIOError(
                        f"images must come sorted by class (identity ranges need each class "
                        f"contiguous): class {label} after {last} at image {n}")
                n += 1
                _check_exact(label, "class")
                _check_exact(n, "record index")
                if label != last:
                    starts.append(n)
                    last = label
                blob = encode_record(pack_image(float(label), n, image))
                rec.write(blob)
                idx.write(f"{n}\t{offset}\n")
                offset += len(blob)
            ends = starts[1:] + array("q", [n + 1])
            for k, (start, end) in enumerate(zip(starts, ends)):
                _check_exact(n + 1 + k, "record index")
                blob = encode_record(pack_image(0, 0, b"", (float(start), float(end))))
                rec.write(blob)
                idx.write(f"{n + 1 + k}\t{offset}\n")
                offset += len(blob)
            _check_exact(n + 1 + len(starts), "record index")
            final = encode_record(pack_image(0, 0, b"", (float(n + 1), float(n + 1 + len(starts)))))
            if len(final) != len(header):
                raise RecordIOError("header record changed size")  # cannot happen, see above
            rec.seek(0)
            rec.write(final)
        tmp["property"].write_text(f"{len(starts)},{image_size[0]},{image_size[1]}\n")
        for name in names:
            os.replace(tmp[name], folder / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return {"images": n, "classes": len(starts)}
