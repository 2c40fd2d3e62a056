"""RecordIO reading without mxnet, against .rec/.idx files written here by an independent writer
that follows dmlc-core's ``RecordIOWriter::WriteRecord`` (what mxnet and insightface use)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pipeline import recordio

MAGIC = 0xCED7230A
M = struct.pack("<I", MAGIC)  # the magic as it appears inside a payload
IR_HEADER_SIZE = 24  # u32 flag, f32 label, u64 id, u64 id2


def _head(cflag: int, length: int) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << 29) | length)


def dmlc_write_record(payload: bytes) -> bytes:
    """One record exactly as dmlc-core's WriteRecord writes it: split at each 4-byte-aligned magic
    inside the payload, dropping those 4 bytes (the reader puts them back); cflag 1 first, 2 middle,
    3 last, 0 whole; zero padding to 4 bytes after the last part only."""
    n = len(payload)
    lower, upper = n & ~3, (n + 3) & ~3
    out, dptr = bytearray(), 0
    for i in range(0, lower, 4):
        if payload[i:i + 4] == M:
            out += _head(1 if dptr == 0 else 2, i - dptr) + payload[dptr:i]
            dptr = i + 4
    out += _head(3 if dptr != 0 else 0, n - dptr) + payload[dptr:] + bytes(upper - n)
    return bytes(out)


def record_parts(blob: bytes, offset: int = 0) -> list[tuple[int, int]]:
    """(cflag, length) of each part of the record at ``offset``, to check what the writer split."""
    parts = []
    while True:
        magic, lrec = struct.unpack_from("<II", blob, offset)
        assert magic == MAGIC
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        parts.append((cflag, length))
        offset += 8 + ((length + 3) & ~3)
        if cflag in (0, 3):
            return parts


def write_rec(folder: Path, payloads: list[bytes], name: str = "train") -> tuple[Path, Path]:
    """A .rec of dmlc records plus its .idx ('index<TAB>offset' lines)."""
    offsets, blob = [], bytearray()
    for payload in payloads:
        offsets.append(len(blob))
        blob += dmlc_write_record(payload)
    rec, idx = folder / f"{name}.rec", folder / f"{name}.idx"
    rec.write_bytes(bytes(blob))
    idx.write_text("".join(f"{i}\t{o}\n" for i, o in enumerate(offsets)))
    return rec, idx


def _image_payload(label: float, rid: int, image: bytes, labels: tuple[float, ...] = ()) -> bytes:
    flag = len(labels)
    head = struct.pack("<IfQQ", flag, 0.0 if flag else label, rid, 0)
    return head + (struct.pack(f"<{flag}f", *labels) if flag else b"") + image


def write_insightface_rec(folder: Path, images: list[tuple[int, bytes]]) -> None:
    """insightface layout: record 0 = header (labels: first identity record, end), then images,
    then one record per identity (labels: [start, end) of its images)."""
    n = len(images)
    ids = sorted({lab for lab, _ in images})
    records = [_image_payload(0, 0, b"", (float(n + 1), float(n + 1 + len(ids))))]
    records += [_image_payload(float(lab), i + 1, img) for i, (lab, img) in enumerate(images)]
    for lab in ids:
        idx = [i + 1 for i, (l2, _) in enumerate(images) if l2 == lab]
        records.append(_image_payload(0, 0, b"", (float(min(idx)), float(max(idx) + 1))))
    write_rec(folder, records)
    (folder / "property").write_text(f"{len(ids)},112,112\n")


def plant(data: bytes, *offsets: int) -> bytes:
    """``data`` with the magic written over it at each offset."""
    out = bytearray(data)
    for off in offsets:
        out[off:off + 4] = M
    return bytes(out)


def _read(rec: Path, offset: int = 0) -> bytes:
    with open(rec, "rb") as fh:
        return recordio.read_record(fh, offset)


def test_writer_matches_dmlc_bytes():
    # Hand-derived from the C++: split at 0 and 8 (magic dropped), last part padded, none between.
    assert dmlc_write_record(M + b"abcd" + M + b"xy") == (
        _head(1, 0) + _head(2, 4) + b"abcd" + _head(3, 2) + b"xy\x00\x00")
    assert dmlc_write_record(b"abcde") == _head(0, 5) + b"abcde\x00\x00\x00"
    assert dmlc_write_record(b"") == _head(0, 0)


@pytest.mark.parametrize("payload, n_splits", [
    (M + b"tail data", 1),                      # at offset 0
    (b"abcd" + M + b"efgh", 1),                 # once, in the middle
    (b"abcdefgh" + M, 1),                       # at the very end of an aligned payload
    (M, 1),                                     # nothing but the magic
    (b"abcd" + M + b"efghijkl" + M + b"mn", 2),  # twice
    (M + b"abcdefgh" + M, 2),                   # at offset 0 and at the very end
    (M + M + b"xyz", 2),                        # back to back: an empty middle part
    (b"ab" + M + b"cdefgh" + M, 1),             # unaligned at 2 stays, aligned at 12 splits
], ids=["at0", "middle", "end", "only", "twice", "at0-and-end", "back-to-back", "mixed"])
def test_aligned_magic_splits_and_reads_back(tmp_path, payload, n_splits):
    rec, _ = write_rec(tmp_path, [payload, b"next record"])
    parts = record_parts(rec.read_bytes())
    assert len(parts) == n_splits + 1
    assert [c for c, _ in parts] == [1] + [2] * (n_splits - 1) + [3]
    assert sum(n for _, n in parts) == len(payload) - 4 * n_splits  # the magic itself was dropped
    assert _read(rec) == payload
    assert _read(rec, len(dmlc_write_record(payload))) == b"next record"


@pytest.mark.parametrize("payload", [
    b"a" + M + b"bcd",          # offset 1
    b"ab" + M + b"cd",          # offset 2
    b"abc" + M,                 # offset 3, ends the payload
    b"abcde" + M + b"fgh",      # offset 5
    b"abcdefghi" + M + b"jk",  # offset 9, payload not a multiple of 4
], ids=["at1", "at2", "at3-end", "at5", "at9"])
def test_unaligned_magic_is_not_split(tmp_path, payload):
    rec, _ = write_rec(tmp_path, [payload])
    assert record_parts(rec.read_bytes()) == [(0, len(payload))]
    assert _read(rec) == payload


def test_lfw_jpeg_with_planted_magic(tmp_path, lfw_small):
    jpgs = sorted((lfw_small / "lfw-deepfunneled").rglob("*.jpg"))[:3]
    images = [p.read_bytes() for p in jpgs]
    # Image bytes start at payload offset 24 (aligned), so an image offset k is aligned iff k % 4 == 0.
    last = (len(images[0]) - 4) & ~3
    planted = [
        plant(images[0], 0, 100, 104, last),   # aligned: start, back to back, the very end
        plant(images[1], 1001, 2002, 3003),    # unaligned only: one part
        plant(images[2], 64, 501, 1000),       # mixed
    ]
    payloads = [_image_payload(float(i), i + 1, img) for i, img in enumerate(planted)]
    rec, idx = write_rec(tmp_path, payloads)
    blob = rec.read_bytes()
    offsets = [off for _, off in recordio.read_index(idx)]
    assert [len(record_parts(blob, off)) for off in offsets] == [5, 1, 3]
    with open(rec, "rb") as fh:
        recs = [recordio.unpack_image(recordio.read_record(fh, off)) for off in offsets]
    assert [r.image for r in recs] == planted
    assert [(r.label, r.id) for r in recs] == [(0.0, 1), (1.0, 2), (2.0, 3)]


def test_reads_images_labels_and_skips_header(tmp_path, lfw_small):
    jpgs = sorted((lfw_small / "lfw-deepfunneled").rglob("*.jpg"))[:5]
    split = plant(jpgs[1].read_bytes(), 40, 400)  # aligned in the payload: a 3-part record
    images = [(7, jpgs[0].read_bytes()), (7, split), (9, jpgs[2].read_bytes())]
    write_insightface_rec(tmp_path, images)
    offsets = recordio.image_record_offsets(tmp_path / "train.rec", tmp_path / "train.idx")
    assert [i for i, _ in offsets] == [1, 2, 3]
    assert len(record_parts((tmp_path / "train.rec").read_bytes(), offsets[1][1])) == 3
    with open(tmp_path / "train.rec", "rb") as fh:
        recs = [recordio.unpack_image(recordio.read_record(fh, off)) for _, off in offsets]
    assert [r.label for r in recs] == [7.0, 7.0, 9.0]
    assert [r.image for r in recs] == [img for _, img in images]
    assert [r.id for r in recs] == [1, 2, 3]


def test_bad_magic_and_truncation(tmp_path):
    (tmp_path / "x.rec").write_bytes(b"\x00" * 16)
    with open(tmp_path / "x.rec", "rb") as fh, pytest.raises(recordio.RecordIOError, match="bad magic"):
        recordio.read_record(fh, 0)
    cases = {
        "payload": dmlc_write_record(b"abcdefgh")[:10],
        "padding": dmlc_write_record(b"abcde")[:-1],  # dmlc reads each part padded to 4 bytes
        "next part": dmlc_write_record(b"abcd" + M + b"efgh")[:16],  # cut in the 2nd part's header
    }
    for blob in cases.values():
        (tmp_path / "y.rec").write_bytes(blob)
        with open(tmp_path / "y.rec", "rb") as fh, pytest.raises(recordio.RecordIOError, match="truncated"):
            recordio.read_record(fh, 0)
    (tmp_path / "z.idx").write_text("0 0 0\n")
    with pytest.raises(recordio.RecordIOError, match="expected"):
        recordio.read_index(tmp_path / "z.idx")
