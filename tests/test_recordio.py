"""RecordIO reading without mxnet, against a .rec/.idx pair written here by an independent writer."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pipeline import recordio

MAGIC = 0xCED7230A


def _pack_record(payload: bytes, cflag: int = 0) -> bytes:
    head = struct.pack("<II", MAGIC, (cflag << 29) | len(payload))
    return head + payload + b"\x00" * ((4 - len(payload) % 4) % 4)


def _image_payload(label: float, rid: int, image: bytes, labels: tuple[float, ...] = ()) -> bytes:
    flag = len(labels)
    head = struct.pack("<IfQQ", flag, 0.0 if flag else label, rid, 0)
    return head + (struct.pack(f"<{flag}f", *labels) if flag else b"") + image


def write_insightface_rec(folder: Path, images: list[tuple[int, bytes]], split_record: bool = False) -> None:
    """insightface layout: record 0 = header (labels: first identity record, end), then images,
    then one record per identity (labels: [start, end) of its images)."""
    n = len(images)
    ids = sorted({lab for lab, _ in images})
    records = [_image_payload(0, 0, b"", (float(n + 1), float(n + 1 + len(ids))))]
    records += [_image_payload(float(lab), i + 1, img) for i, (lab, img) in enumerate(images)]
    for lab in ids:
        idx = [i + 1 for i, (l2, _) in enumerate(images) if l2 == lab]
        records.append(_image_payload(0, 0, b"", (float(min(idx)), float(max(idx) + 1))))
    offsets, blob = [], bytearray()
    for i, payload in enumerate(records):
        offsets.append(len(blob))
        if split_record and i == 1:  # exercise continuation records (cflag 1 .. 3)
            third = len(payload) // 3
            blob += _pack_record(payload[:third], 1) + _pack_record(payload[third:2 * third], 2)
            blob += _pack_record(payload[2 * third:], 3)
        else:
            blob += _pack_record(payload)
    (folder / "train.rec").write_bytes(bytes(blob))
    (folder / "train.idx").write_text("".join(f"{i}\t{o}\n" for i, o in enumerate(offsets)))
    (folder / "property").write_text(f"{len(ids)},112,112\n")


def test_reads_images_labels_and_skips_header(tmp_path, lfw_small):
    jpgs = sorted((lfw_small / "lfw-deepfunneled").rglob("*.jpg"))[:5]
    images = [(7, jpgs[0].read_bytes()), (7, jpgs[1].read_bytes()), (9, jpgs[2].read_bytes())]
    write_insightface_rec(tmp_path, images, split_record=True)
    offsets = recordio.image_record_offsets(tmp_path / "train.rec", tmp_path / "train.idx")
    assert [i for i, _ in offsets] == [1, 2, 3]
    with open(tmp_path / "train.rec", "rb") as fh:
        recs = [recordio.unpack_image(recordio.read_record(fh, off)) for _, off in offsets]
    assert [r.label for r in recs] == [7.0, 7.0, 9.0]
    assert [r.image for r in recs] == [img for _, img in images]
    assert [r.id for r in recs] == [1, 2, 3]


def test_bad_magic_and_truncation(tmp_path):
    (tmp_path / "x.rec").write_bytes(b"\x00" * 16)
    with open(tmp_path / "x.rec", "rb") as fh, pytest.raises(recordio.RecordIOError, match="bad magic"):
        recordio.read_record(fh, 0)
    (tmp_path / "y.rec").write_bytes(_pack_record(b"abcdefgh")[:10])
    with open(tmp_path / "y.rec", "rb") as fh, pytest.raises(recordio.RecordIOError, match="truncated"):
        recordio.read_record(fh, 0)
    (tmp_path / "z.idx").write_text("0 0 0\n")
    with pytest.raises(recordio.RecordIOError, match="expected"):
        recordio.read_index(tmp_path / "z.idx")
