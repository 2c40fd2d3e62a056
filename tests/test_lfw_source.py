"""Obtaining LFW: link a local copy, extract an archive safely, one clear message when offline."""
from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data.lfw_source import LfwSourceError, is_lfw_folder, prepare_lfw, safe_extract
from pipeline.data.tar_chunks import UnsafeArchiveError
from tests.conftest import lfw_root


def test_links_a_local_folder_once(tmp_path):
    dest = tmp_path / "data" / "sources" / "lfw"
    prepare_lfw(dest, source=str(lfw_root()))
    assert dest.is_symlink() and is_lfw_folder(dest) and dest.resolve() == lfw_root().resolve()
    before = dest.lstat().st_mtime_ns
    prepare_lfw(dest, source=str(lfw_root()))  # already there: nothing redone
    assert dest.lstat().st_mtime_ns == before


def test_a_folder_it_did_not_make_is_never_deleted(tmp_path):
    """Linking LFW_SOURCE over data/sources/lfw replaced whatever folder stood there (rmtree)."""
    dest = tmp_path / "data" / "sources" / "lfw"
    (dest / "mine").mkdir(parents=True)
    (dest / "mine" / "notes.txt").write_text("a user's own files")
    with pytest.raises(LfwSourceError, match="a folder this tool did not make: move it away"):
        prepare_lfw(dest, source=str(lfw_root()))
    assert (dest / "mine" / "notes.txt").read_text() == "a user's own files"
    (dest / "mine" / "notes.txt").unlink()
    (dest / "mine").rmdir()
    (dest / ".lfw_complete").write_text("ok\n")  # one this tool extracted: replaced by the link
    prepare_lfw(dest, source=str(lfw_root()))
    assert dest.is_symlink() and dest.resolve() == lfw_root().resolve()


def test_extracts_an_archive_with_protocol_files(tmp_path, lfw_small):
    src = tmp_path / "dl"
    src.mkdir()
    with tarfile.open(src / "lfw-deepfunneled.tgz", "w:gz") as tar:
        tar.add(lfw_small / "lfw-deepfunneled", arcname="lfw-deepfunneled")
    for name in ("peopleDevTrain.txt", "peopleDevTest.txt", "pairsDevTrain.txt", "pairsDevTest.txt", "pairs.txt"):
        (src / name).write_bytes((lfw_small / name).read_bytes())
    dest = tmp_path / "lfw"
    # a subset's image tree and filtered pairs cannot match the official hashes: checked, and refused
    with pytest.raises(LfwSourceError, match="sha256 differs"):
        prepare_lfw(dest, source=str(src))
    for name in ("peopleDevTrain.txt", "peopleDevTest.txt", "pairsDevTrain.txt", "pairsDevTest.txt", "pairs.txt"):
        (src / name).write_bytes((lfw_root() / name).read_bytes())
    with pytest.raises(LfwSourceError, match="content hash differs"):
        prepare_lfw(dest, source=str(src))
    prepare_lfw(dest, source=str(src), verify_images=False)
    assert is_lfw_folder(dest) and not dest.is_symlink()
    assert sorted(p.name for p in (dest / "lfw-deepfunneled").iterdir()) == \
        sorted(p.name for p in (lfw_small / "lfw-deepfunneled").iterdir())


def test_archive_path_traversal_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        ti = tarfile.TarInfo("../../escaped.txt")
        ti.size = 2
        tar.addfile(ti, io.BytesIO(b"hi"))
    (tmp_path / "evil.tgz").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match="unsafe path"):
        safe_extract(tmp_path / "evil.tgz", tmp_path / "out")
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_offline_without_source_says_how_to_set_lfw_source(tmp_path):
    with pytest.raises(LfwSourceError) as err:
        prepare_lfw(tmp_path / "lfw", source=None, base_url="http://127.0.0.1:9/")
    assert "download failed" in str(err.value) and "LFW_SOURCE=" in str(err.value)


def test_bad_source_path(tmp_path):
    with pytest.raises(LfwSourceError, match="neither an LFW folder nor an archive"):
        prepare_lfw(tmp_path / "lfw", source=str(tmp_path / "nothing"))
