"""Tar chunks: deterministic bytes, round trip, unsafe names refused."""
from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.tar_chunks import (FIXED_MTIME, UnsafeArchiveError, check_key, read_chunk, write_chunk)


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
