"""Obtain LFW (deep-funneled) and its protocol files in one place, verified, fetched at most once.

Order of preference:
1. ``LFW_SOURCE`` (or ``--source``): a folder laid out like the release (``lfw-deepfunneled/`` + the
   protocol .txt files) is linked, not copied; a folder or path holding ``lfw-deepfunneled.tgz``
   (+ protocol files) is extracted safely.
2. Otherwise download the official archive and protocol files and verify their sha256 values
   (the image tree is verified by a hash of every image's relative path and sha256, which does not
   depend on how the archive was compressed).
Offline with no source: one message saying how to set LFW_SOURCE.

``python -m pipeline.data.lfw_source --dest data/sources/lfw``
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

from pipeline.data.tar_chunks import UnsafeArchiveError, check_member_name, file_sha256

IMAGE_DIR = "lfw-deepfunneled"
ARCHIVE = "lfw-deepfunneled.tgz"
N_IMAGES = 13233
# sha256 over sorted "relative/path\t<sha256 of file>\n" lines of every image in lfw-deepfunneled/.
IMAGE_TREE_SHA256 = "8c04ee61355d6a6734594b8fbc9a471b4699aa684db3c6c2bc535d5d7f9f0958"
PROTOCOL_SHA256 = {
    "pairs.txt": "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592",
    "pairsDevTrain.txt": "1d454dada7dfeca0e7eab6f65dc4e97a6312d44cf142207be28d688be92aabfa",
    "pairsDevTest.txt": "7cb06600ea8b2814ac26e946201cdb304296262aad67d046a16a7ec85d0ff87c",
    "peopleDevTrain.txt": "2e58df13ba4cc143189336e001cc2c195f1dfa5b29a6475c02857be353c2a2fa",
    "peopleDevTest.txt": "c3ed1f90499473401542101a56c14c1d82396bb8218c67a356d7460601047555",
    "people.txt": "bc8fa2b7f25c895cf7efb6de4f4fc27ca8b8d1cfa63350ad8b96eae2b198d365",
}
REQUIRED_PROTOCOL = ("peopleDevTrain.txt", "peopleDevTest.txt", "pairsDevTrain.txt",
                     "pairsDevTest.txt", "pairs.txt")
DEFAULT_BASE_URL = "http://vis-www.cs.umass.edu/lfw/"
COMPLETE_MARKER = ".lfw_complete"

HOW_TO = (
    "LFW is not available and could not be downloaded.\n"
    "Set LFW_SOURCE to a local copy, e.g.\n"
    "  LFW_SOURCE=/path/to/lfw make repro\n"
    "where the folder holds lfw-deepfunneled/ (or lfw-deepfunneled.tgz) and the protocol files\n"
    f"{', '.join(REQUIRED_PROTOCOL)} as published on the LFW site."
)


class LfwSourceError(RuntimeError):
    pass


def image_tree_sha256(images: Path) -> tuple[int, str]:
    lines = []
    for dirpath, _, files in os.walk(images):
        for name in files:
            p = os.path.join(dirpath, name)
            lines.append(f"{os.path.relpath(p, images)}\t{file_sha256(p)}\n")
    lines.sort()
    return len(lines), hashlib.sha256("".join(lines).encode()).hexdigest()


def is_lfw_folder(path: Path) -> bool:
    return (path / IMAGE_DIR).is_dir() and all((path / f).is_file() for f in REQUIRED_PROTOCOL)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar(.gz) refusing absolute paths, '..', links and device files."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            check_member_name(m.name)
            if not (m.isreg() or m.isdir()):
                raise UnsafeArchiveError(f"{archive}: refusing non-file member {m.name!r}")
        tar.extractall(dest, members=members, filter="data")


def _download(url: str, dest: Path, sha256: str | None) -> None:
    tmp = dest.with_name(dest.name + ".part")
    print(f"downloading {url}", file=sys.stderr)
    with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as fh:  # noqa: S310
        shutil.copyfileobj(resp, fh, 1 << 20)
    if sha256 and file_sha256(tmp) != sha256:
        tmp.unlink()
        raise LfwSourceError(f"{url}: sha256 mismatch (expected {sha256})")
    os.replace(tmp, dest)


def _copy_protocol(src_dir: Path, dest: Path) -> None:
    for name in list(PROTOCOL_SHA256) + ["lfw-names.txt", "README.txt"]:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dest / name)
    missing = [f for f in REQUIRED_PROTOCOL if not (dest / f).is_file()]
    if missing:
        raise LfwSourceError(f"{src_dir}: missing protocol files {missing}\n{HOW_TO}")


def _from_archive(archive: Path, dest: Path) -> None:
    if dest.is_symlink():
        dest.unlink()
    safe_extract(archive, dest)
    _copy_protocol(archive.parent, dest)


def verify_protocol(folder: Path) -> None:
    for name, expected in PROTOCOL_SHA256.items():
        p = folder / name
        if p.is_file() and file_sha256(p) != expected:
            raise LfwSourceError(f"{p}: sha256 differs from the published file (expected {expected})")


def prepare_lfw(dest: str | Path, source: str | None = None, base_url: str = DEFAULT_BASE_URL,
                verify_images: bool = True) -> Path:
    """Make ``dest`` an LFW folder; returns it. Does nothing when it is already complete."""
    dest = Path(dest)
    if source:
        src = Path(source).expanduser().resolve()
        if src.is_dir() and is_lfw_folder(src):
            if dest.is_symlink() and dest.resolve() == src:
                return dest
            if dest.is_symlink():
                dest.unlink()
            elif (dest / COMPLETE_MARKER).is_file():  # a copy this tool extracted: replaced by the link
                shutil.rmtree(dest)
            elif dest.exists():
                raise LfwSourceError(f"{dest} is a folder this tool did not make: move it away (nothing "
                                     f"is deleted that was not made here) to link {src} there instead")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(src, target_is_directory=True)
            verify_protocol(dest)
            print(f"LFW: linked {dest} -> {src}", file=sys.stderr)
            return dest
        archive = src if src.is_file() else src / ARCHIVE
        if not archive.is_file():
            raise LfwSourceError(f"LFW_SOURCE={source}: neither an LFW folder nor an archive.\n{HOW_TO}")
        if (dest / COMPLETE_MARKER).is_file():
            return dest
        _from_archive(archive, dest)
    else:
        if (dest / COMPLETE_MARKER).is_file() or (dest.is_symlink() and is_lfw_folder(dest)):
            return dest
        downloads = dest.parent / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        try:
            for name in REQUIRED_PROTOCOL + ("people.txt",):
                if not (downloads / name).is_file():
                    _download(base_url + name, downloads / name, PROTOCOL_SHA256[name])
            if not (downloads / ARCHIVE).is_file():
                _download(base_url + ARCHIVE, downloads / ARCHIVE, None)
        except OSError as err:  # URLError is an OSError: no network, DNS failure, refused ...
            raise LfwSourceError(f"download failed: {err}\n{HOW_TO}") from None
        _from_archive(downloads / ARCHIVE, dest)
    verify_protocol(dest)
    if verify_images:
        n, tree = image_tree_sha256(dest / IMAGE_DIR)
        if tree != IMAGE_TREE_SHA256:
            raise LfwSourceError(f"{dest / IMAGE_DIR}: {n} images whose content hash differs from the "
                                 f"official deep-funneled release ({N_IMAGES} images)")
    (dest / COMPLETE_MARKER).write_text("ok\n")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description="Obtain LFW for the ingest stage.")
    ap.add_argument("--dest", default="data/sources/lfw")
    ap.add_argument("--source", default=os.environ.get("LFW_SOURCE") or None)
    ap.add_argument("--base-url", default=os.environ.get("LFW_BASE_URL", DEFAULT_BASE_URL))
    args = ap.parse_args()
    try:
        path = prepare_lfw(args.dest, args.source, args.base_url)
    except LfwSourceError as err:
        sys.exit(f"error: {err}")
    print(f"LFW ready at {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
