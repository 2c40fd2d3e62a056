"""Tar chunks in WebDataset layout, written byte-identically on every run.

Stage outputs that hold images are directories of tar chunks (never one file per image: DVC slows
to hours past ~200k files in an output). A sample is a group of members sharing a key:
``{key}.jpg``, ``{key}.json`` ... Keys are written in sorted order with fixed mtime/uid/gid/mode, so two
clean runs give the same bytes and the same DVC hash. Readers reject unsafe member names.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any constant works; this one is easy to recognise.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")


class UnsafeArchiveError(ValueError):
    """A member name that would escape the extraction folder, or a member that is not a file."""


def check_key(key: str) -> str:
    """Keys may hold letters, digits, '_', '-' and '/' separators; no dots (WebDataset splits there)."""
    if not key or not _KEY_RE.match(key) or key.startswith("/") or "//" in key or key.endswith("/"):
        raise ValueError(f"invalid sample key {key!r}: use letters, digits, '_', '-', '/' (no dots)")
    return key


def check_member_name(name: str) -> str:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"unsafe path in archive: {name!r}")
    return name


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = FIXED_MTIME
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def write_chunk(path: str | Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> str:
    """Write samples (key -> {extension: bytes}) sorted by key; returns the file's sha256.

    The file appears atomically (written to a temporary name, then renamed), so an interrupted run
    never leaves a half chunk that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = sorted(samples, key=lambda s: s[0])
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path.name}: duplicate sample keys")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for key, members in items:
                check_key(key)
                for ext in sorted(members):
                    data = members[ext]
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    os.replace(tmp, path)
    return file_sha256(path)


def read_chunk(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) in file order; refuses links, devices and unsafe names."""
    current: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:*") as tar:
        for ti in tar:
            check_member_name(ti.name)
            if not ti.isreg():
                raise UnsafeArchiveError(f"{path}: member {ti.name!r} is not a regular file")
            base = ti.name.rsplit("/", 1)
            stem, dot, ext = base[-1].partition(".")
            if not dot:
                raise ValueError(f"{path}: member {ti.name!r} has no extension")
            key = (base[0] + "/" + stem) if len(base) == 2 else stem
            if key != current:
                if current is not None:
                    yield current, members
                current, members = key, {}
            members[ext] = tar.extractfile(ti).read()
    if current is not None:
        yield current, members


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def dumps_json(obj) -> bytes:
    """Canonical JSON (sorted keys, no spaces that vary) for deterministic members and files."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False)
    Path(path).write_text(text + "\n")


def list_chunks(folder: str | Path, prefix: str = "") -> list[Path]:
    return sorted(p for p in Path(folder).glob(f"{prefix}*.tar"))
