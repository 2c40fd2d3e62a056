"""RecordIO reading without mxnet, against .rec/.idx files written here by an independent writer
that follows dmlc-core's ``RecordIOWriter::WriteRecord`` (what mxnet and insightface use)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pipeline.data import recordio

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


# --- the library writer, against the independent writer above ------------------------------------

LIBRARY_PAYLOADS = [
    b"", b"a", b"abcde", M, M + b"tail data", b"abcd" + M + b"efgh", b"abcdefgh" + M,
    b"abcd" + M + b"efghijkl" + M + b"mn", M + b"abcdefgh" + M, M + M + b"xyz", M + M + M + M,
    b"ab" + M + b"cdefgh" + M, b"a" + M + b"bcd", b"abc" + M, b"abcdefghi" + M + b"jk",
    b"ab" + M + M + b"cd" + M,  # unaligned magics overlapping aligned positions
    M[:2] + M + M[2:] + b"zz",  # a magic straddling an aligned one
]


@pytest.mark.parametrize("payload", LIBRARY_PAYLOADS)
def test_encode_record_matches_dmlc(payload):
    assert recordio.encode_record(payload) == dmlc_write_record(payload)


def test_encode_record_matches_dmlc_on_random_payloads():
    import random
    rnd = random.Random(0)
    for _ in range(300):
        data = bytearray(rnd.randbytes(rnd.randrange(0, 80)))
        for _ in range(rnd.randrange(0, 6)):  # magics at random, aligned or not
            if len(data) >= 4:
                at = rnd.randrange(0, len(data) - 3)
                data[at:at + 4] = M
        assert recordio.encode_record(bytes(data)) == dmlc_write_record(bytes(data))


def _reference(folder: Path, images) -> None:
    folder.mkdir()
    write_insightface_rec(folder, list(images))


def _lfw_images(lfw_small, n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((lfw_small / "lfw-deepfunneled").rglob("*.jpg"))[:n]]


def _tricky_images(lfw_small) -> list[tuple[int, bytes]]:
    jpgs = _lfw_images(lfw_small, 6)
    last = (len(jpgs[0]) - 4) & ~3
    return [
        (0, plant(jpgs[0], 0, 100, 104, last)),   # aligned magics: a 5-part record
        (0, plant(jpgs[1], 1001, 2002)),          # unaligned only
        (0, jpgs[2][:-1]),                         # odd length: padded
        (3, jpgs[3]),                              # classes need not be contiguous
        (3, b""),                                  # an empty image still gets a record
        (4, M + jpgs[4][:-2]),                     # magic right after the IRHeader
        (7, jpgs[5]),
    ]


def test_library_writer_is_byte_identical_to_independent_writer(tmp_path, lfw_small):
    images = _tricky_images(lfw_small)
    _reference(tmp_path / "ref", images)
    summary = recordio.write_insightface_rec(tmp_path / "lib", (x for x in images))  # a generator
    assert summary == {"images": len(images), "classes": 4}
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "lib" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["property", "train.idx", "train.rec"]
    rec, idx = tmp_path / "lib" / "train.rec", tmp_path / "lib" / "train.idx"
    offsets = recordio.image_record_offsets(rec, idx)
    with open(rec, "rb") as fh:
        recs = [recordio.unpack_image(recordio.read_record(fh, off)) for _, off in offsets]
    assert [(r.label, r.id, r.image) for r in recs] == [(float(c), i, img) for i, (c, img) in enumerate(images, 1)]


@pytest.mark.parametrize("images", [[], [(0, b"x")], [(5, b"abcd")] * 3],
                         ids=["empty", "one", "one-class"])
def test_library_writer_small_cases(tmp_path, images):
    _reference(tmp_path / "ref", images)
    recordio.write_insightface_rec(tmp_path / "lib", images)
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "lib" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_library_writer_accepts_numpy_ints(tmp_path):
    import numpy as np
    recordio.write_insightface_rec(tmp_path / "lib", [(np.int64(2), b"ab"), (np.int32(2), b"cd")])
    _reference(tmp_path / "ref", [(2, b"ab"), (2, b"cd")])
    assert (tmp_path / "lib" / "train.rec").read_bytes() == (tmp_path / "ref" / "train.rec").read_bytes()


@pytest.mark.parametrize("images, match", [
    ([(1, b"a"), (0, b"b")], "sorted by class"),
    ([(0, b"a"), (1, b"b"), (0, b"c")], "sorted by class"),
    ([(-1, b"a")], "int >= 0"),
    ([(1.0, b"a")], "int >= 0"),
    ([(True, b"a")], "int >= 0"),
    ([((1 << 24) + 1, b"a")], "2\\^24"),
], ids=["descending", "regrouped", "negative", "float", "bool", "over-float32"])
def test_library_writer_refuses_bad_labels_and_leaves_nothing(tmp_path, images, match):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.rec").write_bytes(b"older set")  # a complete older set stays as it was
    with pytest.raises(recordio.RecordIOError, match=match):
        recordio.write_insightface_rec(tmp_path / "out", iter(images))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["train.rec"]
    assert (tmp_path / "out" / "train.rec").read_bytes() == b"older set"


# --- read_label: the IRHeader only ------------------------------------------------------------------

MAGIC_FLOAT = struct.unpack("<f", M)[0]  # a float32 whose bytes are the magic


def _label_payloads(lfw_small) -> list[bytes]:
    jpgs = _lfw_images(lfw_small, 4)
    return [
        _image_payload(3.0, 1, jpgs[0]),                            # plain
        _image_payload(4.0, 2, plant(jpgs[1], 40, 400)),            # split in the JPEG: 3 parts
        _image_payload(5.0, MAGIC, jpgs[2]),                        # magic in the IRHeader's id (offset 8)
        _image_payload(MAGIC_FLOAT, 4, jpgs[3]),                    # magic as the header label (offset 4)
        _image_payload(0, 5, jpgs[0], (6.0, 1.0, 2.0)),             # flag 3: the first label is the class
        _image_payload(0, MAGIC, jpgs[1], (MAGIC_FLOAT, 9.0)),      # magic in the label array (offset 24)
        _image_payload(0, 7, jpgs[2], (8.0, MAGIC_FLOAT)),          # magic at the second label (offset 28)
        _image_payload(0, 8, plant(jpgs[3], 0), (10.0,)),          # magic right after the label array
        _image_payload(11.0, 9, b""),                               # no image at all
    ]


def test_read_label_matches_read_record(tmp_path, lfw_small):
    payloads = _label_payloads(lfw_small)
    rec, idx = write_rec(tmp_path, payloads)
    blob = rec.read_bytes()
    offsets = [off for _, off in recordio.read_index(idx)]
    assert [len(record_parts(blob, off)) for off in offsets] == [1, 3, 2, 2, 1, 3, 2, 2, 1]
    with open(rec, "rb") as fh:
        expected = [recordio.unpack_image(recordio.read_record(fh, off)).label for off in offsets]
        got = [recordio.read_label(fh, off) for off in offsets]
    assert got == expected
    assert expected[:3] == [3.0, 4.0, 5.0] and expected[4] == 6.0 and expected[6] == 8.0


class CountingFile:
    """A raw (unbuffered) file that counts the bytes its reads return."""

    def __init__(self, path: Path):
        self.fh = open(path, "rb", buffering=0)
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.bytes_read += len(data)
        return data

    def seek(self, *args) -> int:
        return self.fh.seek(*args)

    def close(self) -> None:
        self.fh.close()


def test_read_label_reads_headers_not_payloads(tmp_path, lfw_small):
    jpgs = _lfw_images(lfw_small, 8)
    images = [(i // 3, jpgs[i % len(jpgs)]) for i in range(40)]
    recordio.write_insightface_rec(tmp_path, images)
    rec = tmp_path / "train.rec"
    offsets = recordio.image_record_offsets(rec, tmp_path / "train.idx")
    fh = CountingFile(rec)
    try:
        labels = [recordio.read_label(fh, off) for _, off in offsets]
    finally:
        fh.close()
    assert labels == [float(c) for c, _ in images]
    assert fh.bytes_read <= 64 * len(offsets)
    assert rec.stat().st_size > 100 * fh.bytes_read  # the JPEGs were not read


def test_read_label_errors(tmp_path):
    cases = {
        "bad magic": b"\x00" * 40,
        "truncated record header": dmlc_write_record(_image_payload(1.0, 1, b"jpeg"))[:6],
        "truncated record payload": dmlc_write_record(_image_payload(1.0, 1, b"jpeg"))[:20],
        "shorter than its IRHeader": dmlc_write_record(b"short"),
        "shorter than its label array": dmlc_write_record(struct.pack("<IfQQ", 5, 0.0, 1, 0) + b"ab"),
    }
    for match, blob in cases.items():
        (tmp_path / "x.rec").write_bytes(blob)
        with open(tmp_path / "x.rec", "rb") as fh, pytest.raises(recordio.RecordIOError, match=match):
            recordio.read_label(fh, 0)
    blob = dmlc_write_record(_image_payload(1.0, 1, b"abcd" + M + b"efgh"))
    (tmp_path / "y.rec").write_bytes(blob)
    second = 8 + 28  # the 2nd part: the IRHeader and 'abcd'
    with open(tmp_path / "y.rec", "rb") as fh, pytest.raises(recordio.RecordIOError, match="continuation"):
        recordio.read_label(fh, second)
