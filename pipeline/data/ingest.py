"""Ingest a face data set into raw tar chunks plus a manifest that accounts for every input file.

Sources: an LFW release (split from View 1: peopleDevTrain -> train, peopleDevTest -> test), an
ImageFolder ``root/<identity>/<image>`` (any depth under the identity folder) or an insightface
RecordIO pair. Each file is decoded and vetted (:mod:`pipeline.data.image_check`); bad files are rejected
with a reason, exact duplicates are reported, and the stage asserts ``in = accepted + rejected``.

Streaming: the listing keeps one small :class:`SourceItem` per file; chunks are vetted in parallel
and each chunk's manifest rows go to ``manifest.parquet`` as it finishes (one row group per chunk),
counted into the summary and dropped. Manifest order: chunk order (rejected-before-decoding files,
chunk name '', first; then ``test-NNNNNN``, ``train-NNNNNN``), image ids sorted within a chunk,
i.e. (split, image_id) order, whatever the chunk size or worker count. Duplicates need no rows in
memory: 16 bytes of each accepted file's sha256 are kept, and only when two match is the manifest
read again (streamed) to find, per repeated sha256, the first image id and mark the others.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import recordio
from pipeline.config import ComputeParams, DatasetParams, IngestParams
from pipeline.data.image_check import check_image
from pipeline.parallel import iter_chunks
from pipeline.data.protocols import ProtocolError, read_people
from pipeline.data.tar_chunks import dumps_json, record_chunks, write_chunk, write_json

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
LFW_IMAGE_DIRS = ("lfw-deepfunneled", "lfw_funneled", "lfw-funneled", "lfw")
LFW_PROTOCOL_FILES = ("peopleDevTrain.txt", "peopleDevTest.txt", "pairsDevTrain.txt",
                      "pairsDevTest.txt", "pairs.txt", "people.txt", "lfw-names.txt")
SPLITS = ("train", "test")

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("identity", pa.string()), ("split", pa.string()),
    ("source_path", pa.string()), ("sha256", pa.string()), ("file_bytes", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("stored_as", pa.string()),
    ("chunk", pa.string()), ("duplicate_of", pa.string()),
])


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One input file, found by a source lister; ``reason`` set means rejected before decoding.
    The listing holds one per file (slots, identity names interned: ~250 bytes each)."""

    image_id: str
    identity: str
    split: str
    source_path: str  # relative to the source root ("train.rec@offset" for RecordIO)
    rec_offset: int = -1
    reason: str = ""


class IngestError(RuntimeError):
    pass


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


def make_image_id(rel_path: str, taken: set[str]) -> str:
    """A WebDataset-safe key from a relative path: extension dropped, other characters -> '_'."""
    stem, ext = os.path.splitext(rel_path.replace(os.sep, "/"))
    key = _UNSAFE.sub("_", stem).strip("/") or "_"
    if key in taken:
        key = f"{key}_{ext.lstrip('.').lower() or 'noext'}"
    base, n = key, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def walk_source(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Files under root (relative, sorted, any depth) and the links not taken, each with a reason.

    Ingest reads exactly what DVC hashes for the stage's source dependency, so that a change to
    anything it read reruns it: DVC reads a file link's target but never looks behind a folder link
    (nor can it hash a broken one), so ingest follows file links and no folder link. A folder link
    into the source would list its files again under another identity; one out of the source holds
    files DVC would not see change (copy the folder in, or link its files: ``cp -rs``). A file link
    into the source is not listed (its target is), nor a second link to the same file. ``root``
    itself may be a link (DVC follows the dependency's own path).
    """
    top = os.path.realpath(root)
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    linked: dict[str, str] = {}  # real file behind a file link -> the link listed for it

    def inside(target: str) -> str | None:
        return os.path.relpath(target, top) if _inside(target, top) else None

    def folder_link(path: str) -> str:
        target = os.path.realpath(path)
        if inside(target) is not None:
            return f"folder link not followed: points inside the source (to {inside(target)})"
        if _inside(top, target):
            return f"folder link not followed: points to {target}, which holds the source (a cycle)"
        return (f"folder link not followed: points out of the source (to {target}), where DVC does not look, "
                "so a change there would not rerun ingest: copy the folder in, or link its files (cp -rs)")

    def file_link(rel: str, path: str) -> None:
        target = os.path.realpath(path)
        if not os.path.exists(target):
            skipped.append((rel, f"broken link: cannot reach {target} (missing, or a link loop)"))
        elif inside(target) is not None:
            skipped.append((rel, f"file link not listed: points inside the source (to {inside(target)})"))
        elif target in linked:
            skipped.append((rel, f"not listed: same file as {linked[target]}"))
        else:
            linked[target] = rel
            files.append(rel)

    def walk(folder: str, rel: str) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            skipped.append((rel or ".", f"unreadable folder: {err}"))
            return
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            if not e.is_symlink() and _is_dir(e):
                walk(e.path, r)
            elif not e.is_symlink():
                files.append(r)
            elif _is_dir(e):
                skipped.append((r, folder_link(e.path)))
            else:
                file_link(r, e.path)

    walk(top, "")
    return sorted(files), sorted(skipped)


def _is_dir(entry: os.DirEntry) -> bool:
    """A folder, or a link to one; False for a link loop (``a -> a``, ``a -> b -> a``), which
    :func:`walk_source` then reports as a link it cannot reach."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def list_imagefolder(root: Path, split_of=None) -> list[SourceItem]:
    """Files of ``root/<identity>/...``; files outside an identity folder or with other extensions
    are listed as rejected so they show up in the manifest, as are links not taken (one row each)."""
    if not root.is_dir():
        raise IngestError(f"image folder not found: {root}")
    items, taken = [], set()
    files, skipped = walk_source(root)
    for rel in files:
        parts = rel.replace(os.sep, "/").split("/")
        identity = sys.intern(parts[0]) if len(parts) > 1 else ""
        ext = os.path.splitext(rel)[1].lower()
        reason = ""
        if not identity:
            reason = "file not inside an identity folder"
        elif ext not in IMAGE_EXTENSIONS:
            reason = f"unsupported extension {ext or '(none)'}; allowed: {sorted(IMAGE_EXTENSIONS)}"
        split = split_of(identity) if (split_of and identity) else ""
        if not reason and split_of is not None and not split:
            reason = "identity not in the split's protocol lists"
        items.append(SourceItem(make_image_id(rel, taken), identity, split, rel, reason=reason))
    for rel, reason in skipped:  # ids after the files', so a link never renames an image
        parts = rel.split("/")
        identity = parts[0] if len(parts) > 1 else ""
        items.append(SourceItem(make_image_id(rel, taken), identity, "", rel, reason=reason))
    return items


def find_lfw_images(root: Path) -> Path:
    for name in LFW_IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise IngestError(f"{root}: no LFW image folder (looked for {', '.join(LFW_IMAGE_DIRS)})")


def list_lfw(root: Path) -> list[SourceItem]:
    for name in ("peopleDevTrain.txt", "peopleDevTest.txt"):
        if not (root / name).is_file():
            raise IngestError(f"{root}: missing LFW protocol file {name} (View 1 gives the split)")
    try:
        train = read_people(root / "peopleDevTrain.txt")
        test = read_people(root / "peopleDevTest.txt")
    except ProtocolError as err:
        raise IngestError(str(err)) from err
    if train & test:
        raise IngestError(f"View 1 train and test people overlap: {sorted(train & test)[:5]}")
    split = {**{p: "train" for p in train}, **{p: "test" for p in test}}
    images = find_lfw_images(root)
    items = list_imagefolder(images, split_of=lambda ident: split.get(ident, ""))
    prefix = images.name + "/"
    return [replace(it, source_path=prefix + it.source_path) for it in items]


def list_recordio(root: Path) -> list[SourceItem]:
    rec, idx = root / "train.rec", root / "train.idx"
    if not rec.is_file() or not idx.is_file():
        raise IngestError(f"{root}: RecordIO source needs train.rec and train.idx")
    items, taken = [], set()
    with open(rec, "rb") as fh:
        for i, off in recordio.image_record_offsets(rec, idx):
            reason, identity = "", ""
            try:
                label = recordio.read_label(fh, off)  # the record header only, not the JPEG
                identity = sys.intern(f"id_{int(label):07d}")
            except (recordio.RecordIOError, ValueError, OverflowError) as err:
                reason = f"bad record: {err}"
            image_id = make_image_id(f"{identity or 'unlabelled'}/{i:09d}", taken)
            items.append(SourceItem(image_id, identity, "", f"train.rec@{off}", off, reason))
    return items


def list_source(dataset: DatasetParams) -> list[SourceItem]:
    """Every file of the data set. LFW is split by View 1 (train / test people); an external
    training set (imagefolder, recordio) is all ``train``: evaluation is always on LFW."""
    root = Path(dataset.path)
    if not root.exists():
        raise IngestError(f"datasets.*.path={dataset.path!r} does not exist (source {dataset.source})")
    if dataset.source == "lfw":
        return list_lfw(root)
    items = list_imagefolder(root) if dataset.source == "imagefolder" else list_recordio(root)
    return [replace(it, split="train" if it.identity and not it.reason else "") for it in items]


def _read_bytes(root: Path, item: SourceItem, rec: BinaryIO | None) -> bytes:
    if item.rec_offset >= 0:
        return recordio.unpack_image(recordio.read_record(rec, item.rec_offset)).image
    return (root / item.source_path).read_bytes()


def ingest_chunk(job: tuple[str, list[SourceItem]], *, root: Path, out_dir: Path,
                 min_side: int, max_pixels: int) -> list[dict]:
    """Vet the files of one chunk, write the accepted ones to ``out_dir/<chunk>.tar``; rows back."""
    chunk, items = job
    rows, samples = [], []
    with contextlib.ExitStack() as stack:  # a RecordIO source: one open file per chunk
        rec = (stack.enter_context(open(root / "train.rec", "rb"))
               if any(it.rec_offset >= 0 for it in items) else None)
        for it in items:
            rows.append(_ingest_item(it, root, rec, chunk, samples, min_side, max_pixels))
    if samples:
        write_chunk(out_dir / f"{chunk}.tar", samples)
    return rows


def _ingest_item(it: SourceItem, root: Path, rec: BinaryIO | None, chunk: str, samples: list,
                 min_side: int, max_pixels: int) -> dict:
    """One file's manifest row; an accepted image is appended to ``samples``."""
    row = {"image_id": it.image_id, "identity": it.identity, "split": it.split,
           "source_path": it.source_path, "sha256": "", "file_bytes": 0, "width": 0, "height": 0,
           "format": "", "status": "rejected", "reason": it.reason, "stored_as": "", "chunk": "",
           "duplicate_of": ""}
    if not it.reason:
        try:
            raw = _read_bytes(root, it, rec)
        except (OSError, recordio.RecordIOError) as err:
            row["reason"] = f"unreadable: {err}"
        else:
            c = check_image(raw, min_side=min_side, max_pixels=max_pixels)
            row.update(sha256=c.sha256, file_bytes=len(raw), width=c.width, height=c.height,
                       format=c.format, status=c.status, reason=c.reason)
            if c.status == "accepted" and chunk:
                row.update(stored_as=c.ext, chunk=chunk + ".tar")
                meta = {"image_id": it.image_id, "identity": it.identity, "split": it.split}
                samples.append((it.image_id, {c.ext: c.data, "json": dumps_json(meta)}))
    return row


def plan_chunks(items: list[SourceItem], chunk_size: int) -> list[tuple[str, list[SourceItem]]]:
    """Split-wise chunks of sorted image ids; items without a split ride in chunks named '' (no
    tar: all rejected), chunk_size at most each too, so every task carries O(chunk_size) items."""
    by_split: dict[str, list[SourceItem]] = defaultdict(list)
    for it in items:
        by_split[it.split if (it.split and not it.reason) else ""].append(it)
    jobs = []
    for split in sorted(by_split):
        group = sorted(by_split[split], key=lambda it: it.image_id)
        for n, start in enumerate(range(0, len(group), chunk_size)):
            jobs.append((f"{split}-{n:06d}" if split else "", group[start:start + chunk_size]))
    return jobs


class IngestSummary:
    """summary.json from running counters: O(identities + rejection reasons), never the rows."""

    def __init__(self) -> None:
        self.inputs = self.accepted = 0
        self.per_split: dict[str, Counter] = defaultdict(Counter)  # split -> identity -> images
        self.reasons: Counter = Counter()

    def add(self, rows: list[dict]) -> None:
        self.inputs += len(rows)
        for r in rows:
            if r["status"] == "accepted":
                self.accepted += 1
                self.per_split[r["split"]][r["identity"]] += 1
            else:
                self.reasons[r["reason"].split(":")[0]] += 1

    def result(self, n_duplicates: int) -> dict:
        per_split = {}
        for split in SPLITS:
            ids = self.per_split.get(split, Counter())
            per_split[split] = {"images": sum(ids.values()), "identities": len(ids),
                                "identities_with_2plus": sum(1 for c in ids.values() if c >= 2)}
        identities = set().union(*self.per_split.values()) if self.per_split else set()
        overlap = set(self.per_split.get("train", ())) & set(self.per_split.get("test", ()))
        return {"inputs": self.inputs, "accepted": self.accepted, "rejected": self.inputs - self.accepted,
                "identities": len(identities), "splits": per_split,
                "rejection_reasons": dict(sorted(self.reasons.items())), "exact_duplicates": n_duplicates,
                "identity_overlap_train_test": len(overlap)}


DIGEST_PREFIX = 16  # bytes of sha256 kept per accepted image to spot candidate duplicates


def _repeated_prefixes(prefixes: bytearray) -> set[bytes]:
    """The DIGEST_PREFIX-byte prefixes that occur more than once."""
    arr = np.frombuffer(bytes(prefixes), dtype=np.dtype((np.void, DIGEST_PREFIX)))
    if arr.size < 2:
        return set()
    arr = np.sort(arr)
    same = arr[1:] == arr[:-1]
    return {bytes(v) for v in arr[1:][same]}


def _mark_duplicates_streaming(tmp: Path, final: Path, candidates: set[bytes]) -> int:
    """Copy the manifest ``tmp`` to ``final`` with duplicate_of set, row group by row group (the
    same row groups): a first streamed pass finds, per repeated sha256 among the candidate
    prefixes, the first accepted image id; the second marks the others. Returns their number."""
    first: dict[str, str] = {}
    count: Counter = Counter()
    src = pq.ParquetFile(tmp)
    for batch in src.iter_batches(columns=["image_id", "status", "sha256"]):
        for image_id, status, sha in zip(*(batch.column(i).to_pylist() for i in range(3))):
            if status == "accepted" and bytes.fromhex(sha[:2 * DIGEST_PREFIX]) in candidates:
                count[sha] += 1
                if sha not in first or image_id < first[sha]:
                    first[sha] = image_id
    first = {sha: i for sha, i in first.items() if count[sha] > 1}
    with pq.ParquetWriter(final, MANIFEST_SCHEMA) as out:
        for g in range(src.num_row_groups):
            rows = src.read_row_group(g).to_pylist()
            for r in rows:
                if r["status"] == "accepted" and r["sha256"] in first and first[r["sha256"]] != r["image_id"]:
                    r["duplicate_of"] = first[r["sha256"]]
            out.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), row_group_size=len(rows))
    return sum(c - 1 for c in count.values() if c > 1)


def copy_protocol(root: Path, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in LFW_PROTOCOL_FILES:
        if (root / name).is_file():
            shutil.copyfile(root / name, out_dir / name)
            copied.append(name)
    return copied


def run_ingest(*, params: IngestParams, dataset: DatasetParams, compute: ComputeParams,
               out_dir: str | Path) -> dict:
    """List, vet and chunk the data set; write chunks/, manifest.parquet, summary.json (+ protocol/)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "chunks").mkdir(parents=True)
    items = list_source(dataset)
    if not items:
        raise IngestError(f"datasets.*.path={dataset.path!r}: no files found")
    n_items = len(items)
    jobs = plan_chunks(items, params.chunk_size)
    del items  # the jobs hold the same items
    root = Path(dataset.path)
    summary = IngestSummary()
    prefixes = bytearray()  # DIGEST_PREFIX bytes per accepted image
    tmp = out_dir / "manifest.parquet.tmp"
    results = iter_chunks(ingest_chunk, jobs, compute, desc="ingest", root=root, out_dir=out_dir / "chunks",
                          min_side=params.min_side, max_pixels=params.max_pixels)
    with contextlib.closing(results), pq.ParquetWriter(tmp, MANIFEST_SCHEMA) as writer:
        for (chunk, chunk_items), rows in zip(jobs, results):
            rows.sort(key=lambda r: r["image_id"])
            if [r["image_id"] for r in rows] != [it.image_id for it in chunk_items]:  # one row per input
                raise IngestError(f"accounting broken in chunk {chunk or '(rejected before decoding)'}: "
                                  f"{len(chunk_items)} in, {len(rows)} rows")
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), row_group_size=len(rows))
            summary.add(rows)
            for r in rows:
                if r["status"] == "accepted":
                    prefixes += bytes.fromhex(r["sha256"][:2 * DIGEST_PREFIX])
    del jobs
    record_chunks(out_dir / "chunks")
    n_acc = summary.accepted
    if summary.inputs != n_items or len(prefixes) != n_acc * DIGEST_PREFIX:
        raise IngestError(f"accounting broken: {n_items} in, {summary.inputs} rows, {n_acc} accepted")
    candidates = _repeated_prefixes(prefixes)
    del prefixes
    if candidates:
        n_dup = _mark_duplicates_streaming(tmp, out_dir / "manifest.parquet", candidates)
        tmp.unlink()
    else:
        n_dup = 0
        tmp.replace(out_dir / "manifest.parquet")
    result = summary.result(n_dup)
    result["source"] = dataset.source
    result["assume_aligned"] = dataset.assume_aligned
    if dataset.source == "lfw":
        result["protocol_files"] = copy_protocol(root, out_dir / "protocol")
    write_json(out_dir / "summary.json", result)
    return result


def manifest_rows(out_dir: str | Path) -> list[dict]:
    return pq.read_table(Path(out_dir) / "manifest.parquet").to_pylist()


def accepted_image_ids(ingest_dir: str | Path) -> list[str] | None:
    """Sorted accepted image ids of an ingest output: what every later stage must account for.
    None when there is no manifest (a folder not made by this stage)."""
    manifest = Path(ingest_dir) / "manifest.parquet"
    if not manifest.is_file():
        return None
    rows = pq.read_table(manifest, columns=["image_id", "status"]).to_pylist()
    return sorted(r["image_id"] for r in rows if r["status"] == "accepted")


def accepted_ids_by_chunk(ingest_dir: str | Path,
                          batch_size: int = 10_000) -> Iterator[tuple[str, list[str]]] | None:
    """(chunk file name, its accepted image ids, sorted) per chunk, in chunk order, streamed from
    the manifest one batch at a time: what :class:`pipeline.stage_report.Accounting` checks a
    stage's chunks against. None when there is no manifest (a folder not made by this stage)."""
    manifest = Path(ingest_dir) / "manifest.parquet"
    if not manifest.is_file():
        return None
    return _runs(manifest, batch_size)


def _runs(manifest: Path, batch_size: int) -> Iterator[tuple[str, list[str]]]:
    current, ids, done = None, [], set()
    src = pq.ParquetFile(manifest)
    for batch in src.iter_batches(batch_size=batch_size, columns=["image_id", "status", "chunk"]):
        for image_id, status, chunk in zip(*(batch.column(i).to_pylist() for i in range(3))):
            if status != "accepted":
                continue
            if chunk != current:
                if current is not None:
                    yield current, sorted(ids)
                if chunk in done or (current is not None and chunk < current):
                    raise IngestError(f"{manifest}: rows not in chunk order ({chunk} after {current}): "
                                      f"made by an older ingest? Run the ingest stage again")
                done.add(chunk)
                current, ids = chunk, []
            ids.append(image_id)
    if current is not None:
        yield current, sorted(ids)
