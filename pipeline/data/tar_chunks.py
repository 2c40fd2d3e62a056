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

TAR_BLOCK = 512
_ZERO_BLOCK = bytes(TAR_BLOCK)
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
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafeArchiveError(f"a control character in a member name: {name!r}")
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


def member_bytes(name: str, size: int) -> int:
    """Bytes one member takes in a GNU tar written by :func:`write_tar`: its header, a GNU long-name
    record when the name is over 100 bytes, and the data padded to 512."""
    n = len(name.encode("utf-8"))
    long_name = TAR_BLOCK + -(-(n + 1) // TAR_BLOCK) * TAR_BLOCK if n > tarfile.LENGTH_NAME else 0
    return long_name + TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_size(content: int) -> int:
    """Size of a closed tar whose members take ``content`` bytes: two zero end blocks, padded to
    tarfile's 10240-byte record."""
    return -(-(content + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def write_tar(path: str | Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> int:
    """Write samples (key -> {extension: bytes}) in the given order, members sorted within a
    sample; returns the number of samples. GNU format (long names as GNU long-name records, never
    PAX), fixed mtime/uid/gid/mode, so the same samples give the same bytes. The file appears
    atomically (written to a temporary name, then renamed): an interrupted run never leaves a half
    tar that looks complete. Duplicate keys are refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    seen: set[str] = set()
    with open(tmp, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for key, members in samples:
                check_key(key)
                if key in seen:
                    raise ValueError(f"{path.name}: duplicate sample key {key!r}")
                seen.add(key)
                for ext in sorted(members):
                    data = members[ext]
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    os.replace(tmp, path)
    return len(seen)


def write_chunk(path: str | Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> str:
    """:func:`write_tar` with the samples sorted by key (stage chunks); returns the file's sha256."""
    write_tar(path, sorted(samples, key=lambda s: s[0]))
    return file_sha256(path)


MAX_MEMBER_BYTES = 256 << 20  # one member (an image, a record); a header claiming more is refused
MAX_EXTENDED_BYTES = 1 << 20  # a GNU long name or a PAX header
_PIECE = 1 << 20  # members are read in pieces: a lying size never allocates more than the file holds


def _fault(path, offset: int, what: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{path}: byte {offset}: {what}")


def _octal(field: bytes, path, offset: int, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256: sizes over 8 GiB, far over any cap here
        raise _fault(path, offset, f"{what} in base-256 (over 8 GiB)")
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if text and not all(48 <= c <= 55 for c in text):
        raise _fault(path, offset, f"{what} {field!r} is not an octal number")
    return int(text, 8) if text else 0


def _check_header(header: bytes, path, offset: int) -> None:
    """The header checksum: the sum of its bytes with the checksum field read as spaces (unsigned,
    or signed as some old tars wrote it)."""
    stored = _octal(header[148:156], path, offset, "header checksum")
    rest = header[:148] + b" " * 8 + header[156:]
    if stored != sum(rest) and stored != sum(b - 256 if b > 127 else b for b in rest):
        raise _fault(path, offset, "header checksum mismatch (a corrupt or altered header)")


def _pax_records(data: bytes, path, offset: int) -> dict[str, bytes]:
    """PAX extended header records, "<length> <key>=<value>\\n" each, <length> counting the whole
    record in bytes; every length checked before it is used."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise _fault(path, offset, f"PAX record at {pos} has no decimal length ({data[pos:pos + 20]!r})")
        length = int(digits)
        end = pos + length
        if length <= len(digits) + 2 or end > len(data):
            raise _fault(path, offset, f"PAX record at {pos} claims {length} bytes ({len(data) - pos} left)")
        if data[end - 1:end] != b"\n":
            raise _fault(path, offset, f"PAX record at {pos} does not end at its length with a newline")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise _fault(path, offset, f"PAX record at {pos} is not key=value")
        records[key.decode("ascii", "replace")] = value
        pos = end
    return records


def _text(raw: bytes, path, offset: int, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fault(path, offset, f"{what} is not UTF-8: {raw[:60]!r}") from None


def _read(fh, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += fh.read(min(_PIECE, size - len(data)))
    return bytes(data)


def iter_tar(path: str | Path, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every regular file, in file order: the one tar reader.

    Parses headers directly (ustar, GNU long names, PAX path records), reading sequentially: Python's
    tarfile costs ~0.6 ms per member, more than decoding a 112 px JPEG. Strict, because chunks come
    from DVC remotes other people write to and from interrupted pulls: every header's checksum is
    verified; every size is bounded by the bytes left in the file and a cap (``max_member_bytes``,
    ``MAX_EXTENDED_BYTES`` for long names and PAX headers) before anything is read; PAX records are
    parsed by their grammar; the archive must end with its zero end blocks and nothing but zeros
    after them, so a file cut at a member boundary or inside a header is an error, never a shorter
    archive. Refuses unsafe names (absolute, '..', drive letters) and links, devices or folders.
    Every fault is an :class:`UnsafeArchiveError` naming the file and the byte offset."""
    path = Path(path)
    with open(path, "rb", buffering=1 << 20) as fh:
        total = os.fstat(fh.fileno()).st_size
        offset = 0
        long_name: str | None = None
        pax_size: int | None = None
        while True:
            header = fh.read(TAR_BLOCK)
            if len(header) < TAR_BLOCK:
                where = "inside a header" if header else "with no end-of-archive blocks"
                raise _fault(path, offset, f"the archive ends {where}: truncated")
            if header == _ZERO_BLOCK:
                if long_name is not None or pax_size is not None:
                    raise _fault(path, offset, "an extended header without its member")
                tail = total - offset - TAR_BLOCK
                if tail < TAR_BLOCK:
                    raise _fault(path, offset, "one end-of-archive block of two: truncated")
                while piece := fh.read(_PIECE):
                    if piece.count(0) != len(piece):
                        raise _fault(path, offset, "data after the end-of-archive blocks")
                return
            _check_header(header, path, offset)
            kind = header[156:157]
            size = _octal(header[124:136], path, offset, "member size")
            if pax_size is not None and kind not in (b"x", b"g", b"L"):
                size, pax_size = pax_size, None
            extended = kind in (b"x", b"g", b"L")
            cap = MAX_EXTENDED_BYTES if extended else max_member_bytes
            left = total - offset - TAR_BLOCK
            padded = size + -size % TAR_BLOCK
            if padded > left:
                raise _fault(path, offset, f"a member of {size} bytes runs past the end of the file "
                                           f"({left} bytes left): truncated")
            if size > cap:
                raise _fault(path, offset, f"a member of {size} bytes is over the cap of {cap}")
            data = _read(fh, size)
            fh.seek(padded - size, 1)
            here, offset = offset, offset + TAR_BLOCK + padded
            if kind == b"L":  # GNU long name: the next member's name
                long_name = _text(data.rstrip(b"\0"), path, here, "a GNU long name")
                continue
            if kind == b"x":  # PAX extended header: its records describe the next member
                records = _pax_records(data, path, here)
                if "path" in records:
                    long_name = _text(records["path"], path, here, "a PAX path")
                if "size" in records:
                    if not records["size"].isdigit():
                        raise _fault(path, here, f"PAX size {records['size'][:30]!r} is not a number")
                    pax_size = int(records["size"])
                continue
            if kind == b"g":  # PAX global header: no per-member meaning
                _pax_records(data, path, here)
                continue
            name = long_name or _text(header[:100].rstrip(b"\0"), path, here, "a member name")
            if long_name is None and header[257:265] == b"ustar\x0000":  # POSIX: prefix field
                prefix = _text(header[345:500].rstrip(b"\0"), path, here, "a name prefix")
                name = f"{prefix}/{name}" if prefix else name
            long_name = None
            check_member_name(name)
            if kind not in (b"0", b"\0"):
                raise _fault(path, here, f"member {name!r} of type {kind!r} is not a regular file")
            yield name, data


def split_member_name(name: str) -> tuple[str, str]:
    """'a/b/key.raw.jpg' -> ('a/b/key', 'raw.jpg'): WebDataset's rule, the key ends at the first
    dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        raise ValueError(f"member {name!r} has no extension")
    return (f"{folder}/{stem}" if folder else stem), ext


def read_chunk(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) in file order; refuses links, devices and unsafe names."""
    current: str | None = None
    members: dict[str, bytes] = {}
    for name, data in iter_tar(path):
        key, ext = split_member_name(name)
        if key != current:
            if current is not None:
                yield current, members
            current, members = key, {}
        members[ext] = data
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


CHUNK_RECORD = "chunks.json"  # in every folder of chunks: what list_chunks checks before reading
MAX_RECORD_BYTES = 16 << 20


def record_chunks(folder: str | Path, entries: Iterable[Mapping] | None = None) -> dict:
    """Write ``folder/chunks.json``: every tar chunk in the folder with its sample count and sha256,
    the last thing a stage does. ``entries`` ({name, samples, sha256} rows) when the stage has them
    already (pack's shards); else each chunk is read back (strictly) to count its samples."""
    folder = Path(folder)
    on_disk = sorted(p.name for p in folder.glob("*.tar"))
    if entries is None:
        entries = [{"name": n, "samples": sum(1 for _ in read_chunk(folder / n)), "sha256": file_sha256(folder / n)}
                   for n in on_disk]
    record = {e["name"]: {"samples": e["samples"], "sha256": e["sha256"]} for e in entries}
    if sorted(record) != on_disk:
        raise ValueError(f"{folder}: the record lists {len(record)} chunks, the folder holds {len(on_disk)}")
    write_json(folder / CHUNK_RECORD, record)
    return record


def list_chunks(folder: str | Path, prefix: str = "") -> list[Path]:
    """The folder's chunks whose names start with ``prefix``, sorted, once they match what the stage
    that wrote them recorded (:func:`record_chunks`): the same set of files and each one's sha256,
    so a truncated, swapped or missing chunk is an error, never a shorter data set."""
    folder = Path(folder)
    record_path = folder / CHUNK_RECORD
    if not record_path.is_file() and not any(folder.glob("*.tar")):
        return []  # nothing written here: the caller says which stage to run
    if not record_path.is_file():
        raise UnsafeArchiveError(f"{folder}: no {CHUNK_RECORD}: chunks are read only from a stage that "
                                 "finished and recorded them (rerun the stage that writes this folder)")
    if record_path.stat().st_size > MAX_RECORD_BYTES:
        raise UnsafeArchiveError(f"{record_path}: over {MAX_RECORD_BYTES} bytes")
    record = json.loads(record_path.read_text())
    on_disk = {p.name for p in folder.glob("*.tar")}
    if not isinstance(record, dict) or set(record) != on_disk:
        names = set(record) if isinstance(record, dict) else set()
        raise UnsafeArchiveError(f"{folder}: chunks recorded but missing {sorted(names - on_disk)[:5]}, "
                                 f"present but not recorded {sorted(on_disk - names)[:5]}")
    chunks = sorted(folder / name for name in on_disk if name.startswith(prefix))
    for chunk in chunks:
        want = record[chunk.name].get("sha256") if isinstance(record[chunk.name], dict) else None
        if file_sha256(chunk) != want:
            raise UnsafeArchiveError(f"{chunk}: sha256 differs from {record_path.name}: the chunk changed or "
                                     "was cut short after its stage wrote it")
    return chunks
