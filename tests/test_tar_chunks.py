"""Tar chunks: deterministic bytes, round trip, unsafe names refused; the reader strict and bounded on
crafted archives (each case under a timeout: the old reader looped forever on some); a folder's
chunks checked against the record its stage wrote."""
from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data.tar_chunks import (CHUNK_RECORD, FIXED_MTIME, UnsafeArchiveError, check_key, iter_tar, list_chunks,
                                      read_chunk, record_chunks, write_chunk)


def test_round_trip_sorted_and_fixed_metadata(tmp_path):
    samples = [("b/two", {"json": b"{}", "jpg": b"\xff\xd8two"}), ("a/one", {"jpg": b"\xff\xd8one"})]
    sha1 = write_chunk(tmp_path / "x.tar", samples)
    sha2 = write_chunk(tmp_path / "y.tar", list(reversed(samples)))
    assert sha1 == sha2  # input order does not matter
    assert list(read_chunk(tmp_path / "x.tar")) == [("a/one", {"jpg": b"\xff\xd8one"}),
                                                    ("b/two", {"jpg": b"\xff\xd8two", "json": b"{}"})]
    with tarfile.open(tmp_path / "x.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["a/one.jpg", "b/two.jpg", "b/two.json"]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(FIXED_MTIME, 0, 0, "", "", 0o644)}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("key", ["", "a.b", "/abs", "a//b", "a/", "sp ace", "../up"])
def test_bad_keys_refused(key):
    with pytest.raises(ValueError):
        check_key(key)


def test_duplicate_keys_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        write_chunk(tmp_path / "d.tar", [("k", {"jpg": b"1"}), ("k", {"png": b"2"})])


@pytest.mark.parametrize("name,kind", [("../evil.jpg", "file"), ("/etc/evil.jpg", "file"),
                                       ("ok/link.jpg", "symlink")])
def test_unsafe_archives_refused(tmp_path, name, kind):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo(name)
        if kind == "symlink":
            ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(ti)
        else:
            ti.size = 3
            tar.addfile(ti, io.BytesIO(b"abc"))
    (tmp_path / "bad.tar").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError):
        list(read_chunk(tmp_path / "bad.tar"))


# ---------------------------------------------------------------- crafted archives
def _header(name: bytes, size: int, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    """A ustar header with a correct checksum (what a hostile writer would also produce)."""
    h = bytearray(512)
    h[:len(name)] = name
    h[100:108] = b"0000644\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"%011o\0" % FIXED_MTIME
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return _header(name, len(data), kind) + data + bytes(-len(data) % 512)


def _archive(tmp_path, *members: bytes, end: bytes = bytes(1024)):
    path = tmp_path / "crafted.tar"
    path.write_bytes(b"".join(members) + end)
    return path


GOOD = _member(b"k/a.jpg", b"\xff\xd8ok")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("records", [b"0 ", b"0 mtime=1\n", b"-5 path=x\n", b"ab path=x\n", b"12path=evil\n",
                                     b"30 path=evil.jpg\n", b"10 path=evil.jpg\n",
                                     b"8 =empty\n", b"9 nokey_\n"])
def test_pax_records_parsed_by_their_grammar(tmp_path, records):
    path = _archive(tmp_path, _member(b"PaxHeader/x", records, b"x"), GOOD)
    with pytest.raises(UnsafeArchiveError, match=r"crafted.tar: byte 0: PAX record"):
        list(iter_tar(path))


@pytest.mark.timeout(10)
def test_a_pax_length_that_swallows_a_newline_is_refused_by_name(tmp_path):
    # grammatical (the record ends at its length with a newline), but the name is 'evil.jpg\n'
    path = _archive(tmp_path, _member(b"PaxHeader/x", b"18 path=evil.jpg\n\n", b"x"), GOOD)
    with pytest.raises(UnsafeArchiveError, match="a control character in a member name"):
        list(iter_tar(path))


def test_a_valid_pax_path_names_the_next_member(tmp_path):
    long = "k/" + "a" * 150 + ".jpg"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo(long)
        ti.size = 2
        tar.addfile(ti, io.BytesIO(b"hi"))
    (tmp_path / "pax.tar").write_bytes(buf.getvalue())
    assert list(iter_tar(tmp_path / "pax.tar")) == [(long, b"hi")]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size_field,match", [
    (b"%011o\0" % (8 << 30), "runs past the end of the file"),  # 8 GiB claimed, 1 KiB there
    (b"\x80" + bytes(3) + (8 << 30).to_bytes(8, "big"), "base-256"),
    (b"12x4\0\0\0\0\0\0\0\0", "not an octal number"),
])
def test_sizes_bounded_before_anything_is_read(tmp_path, size_field, match):
    path = _archive(tmp_path, _header(b"k/big.jpg", 0, size_field=size_field), GOOD)
    with pytest.raises(UnsafeArchiveError, match=match):
        list(iter_tar(path))


def test_a_member_over_the_cap_is_refused(tmp_path):
    path = _archive(tmp_path, _member(b"k/a.jpg", bytes(5000)))
    assert len(list(iter_tar(path))) == 1
    with pytest.raises(UnsafeArchiveError, match="over the cap of 4096"):
        list(iter_tar(path, max_member_bytes=4096))


@pytest.mark.timeout(10)
def test_header_checksums_are_verified(tmp_path):
    flipped = bytearray(GOOD)
    flipped[2] ^= 1  # k/a.jpg -> k/`.jpg: another name, same length
    path = _archive(tmp_path, _member(b"k/b.jpg", b"1"), bytes(flipped))
    with pytest.raises(UnsafeArchiveError, match="byte 1024: header checksum mismatch"):
        list(iter_tar(path))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("cut,match", [
    (1024, "with no end-of-archive blocks"),   # at a member boundary: the second member gone
    (1024 + 100, "inside a header"),
    (1024 + 512 + 1, "runs past the end of the file"),  # inside the data
    (1024 + 1024 + 512, "one end-of-archive block of two"),
])
def test_a_cut_archive_is_an_error_never_a_shorter_one(tmp_path, cut, match):
    whole = _archive(tmp_path, _member(b"k/a.jpg", b"1"), _member(b"k/b.jpg", b"2")).read_bytes()
    assert len(list(iter_tar(tmp_path / "crafted.tar"))) == 2
    (tmp_path / "cut.tar").write_bytes(whole[:cut])
    with pytest.raises(UnsafeArchiveError, match=match):
        list(iter_tar(tmp_path / "cut.tar"))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("members,end,match", [
    ([GOOD], bytes(1024) + b"junk", "data after the end-of-archive blocks"),
    ([_member(b"k/\xff\xfe.jpg", b"1")], bytes(1024), "a member name is not UTF-8"),
    ([_member(b"././@LongLink", b"k/long", b"L")], bytes(1024), "an extended header without its member"),
])
def test_other_faults_name_file_and_offset(tmp_path, members, end, match):
    with pytest.raises(UnsafeArchiveError, match=r"crafted.tar: byte \d+: " + match):
        list(iter_tar(_archive(tmp_path, *members, end=end)))


# ---------------------------------------------------------------- a folder's record
def _folder(tmp_path):
    folder = tmp_path / "chunks"
    for n in range(3):
        write_chunk(folder / f"{n:06d}.tar", [(f"id/{n}_{i}", {"jpg": b"x" * (i + 1)}) for i in range(n + 1)])
    return folder


def test_record_lists_every_chunk_and_list_chunks_checks_it(tmp_path):
    folder = _folder(tmp_path)
    record = record_chunks(folder)
    assert [r["samples"] for r in record.values()] == [1, 2, 3] and (folder / CHUNK_RECORD).is_file()
    assert [p.name for p in list_chunks(folder)] == ["000000.tar", "000001.tar", "000002.tar"]
    assert [p.name for p in list_chunks(folder, prefix="000001")] == ["000001.tar"]
    assert list_chunks(tmp_path / "nothing_here") == []  # the caller names the stage to run


@pytest.mark.parametrize("fault,match", [
    ("truncate", "sha256 differs"), ("swap", "sha256 differs"), ("delete", "recorded but missing"),
    ("extra", "present but not recorded"), ("no_record", "no chunks.json")])
def test_a_changed_or_missing_chunk_is_an_error(tmp_path, fault, match):
    folder = _folder(tmp_path)
    record_chunks(folder)
    one = folder / "000001.tar"
    if fault == "truncate":  # an interrupted pull: a valid tar cut short would read as fewer samples
        one.write_bytes(one.read_bytes()[:1024])
    elif fault == "swap":
        write_chunk(one, [("id/other", {"jpg": b"y"})])
    elif fault == "delete":
        one.unlink()
    elif fault == "extra":
        write_chunk(folder / "000009.tar", [("id/z", {"jpg": b"z"})])
    else:
        (folder / CHUNK_RECORD).unlink()
    with pytest.raises(UnsafeArchiveError, match=match):
        list_chunks(folder)
