"""The mask-bank stage: a folder of real masked photos -> data/mask_bank/ (entries the mask stage
wears, every photo's row, a summary and contact sheets).

The folder (``mask_bank.path``) is walked like an ingest source (:func:`pipeline.data.ingest.walk_source`:
what DVC hashes is what is read; links not taken are rows); a copy of an earlier file is a row, not
a second entry; every photo is vetted like an ingest photo (:func:`pipeline.data.image_check.check_image`,
sizes bounded before decoding) and given to :class:`pipeline.mask.bank.BankBuilder`, in batches of
``BATCH`` sorted files over the workers. Each batch writes ``entries/bank-NNNNN.tar``: per kept photo an RGBA template (``png``, the procedural
templates' frame) and its ``json`` (source, scores, the 68 landmarks in the photo). Outputs depend on the photos and params only.
An empty or missing folder gives an empty bank, and the summary says the masks are procedural only.

Every file is kept or rejected with a reason: ``inputs = kept + rejected``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import BANK_MASK_TYPE, ComputeParams, MaskBankParams
from pipeline.data.image_check import check_image
from pipeline.data.images import decode_rgb, decode_rgba, encode_png
from pipeline.data.ingest import IMAGE_EXTENSIONS, walk_source
from pipeline.mask.bank import SCORE_NAMES, BankBuilder
from pipeline.mask.landmarks import check_predictor
from pipeline.mask.templates import SIZE, Template, canonical_anchors
from pipeline.parallel import iter_chunks
from pipeline.seeding import rank_key
from pipeline.stage_report import SmallestK, StatusWriter, draw_sheet, fit_tile, status_rows, write_png
from pipeline.data.tar_chunks import (dumps_json, file_sha256, list_chunks, read_chunk, record_chunks, write_chunk,
                                      write_json)

BATCH = 64  # photos per worker task and per entries chunk
MAX_FILE_BYTES = 64 << 20  # a photo file larger than this is rejected unread
THUMB = 128  # contact sheet tile side
STATUS_SCHEMA = pa.schema([("source", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                           *[(k, pa.float64()) for k in SCORE_NAMES], ("entry", pa.string())])


class MaskBankError(RuntimeError):
    pass


_BUILDERS: dict[str, BankBuilder] = {}


def _builder(predictor_path: str | None) -> BankBuilder:
    """One builder per worker process (the 68-point predictor takes ~0.5 s to load)."""
    key = str(predictor_path)
    if key not in _BUILDERS:
        _BUILDERS[key] = BankBuilder(predictor_path)
    return _BUILDERS[key]


def list_photos(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(photo files, sorted; [(file, why not)] for links not taken, files that are not photos and
    copies of an earlier file: a photo twice in the folder would be worn twice as often)."""
    if not root.is_dir():
        return [], []
    files, skipped = walk_source(root)
    photos, first = [], {}
    for rel in files:
        ext = os.path.splitext(rel)[1].lower()
        if ext not in IMAGE_EXTENSIONS:
            skipped.append((rel, f"unsupported extension {ext or '(none)'}; allowed: {sorted(IMAGE_EXTENSIONS)}"))
            continue
        digest = file_sha256(root / rel) if (root / rel).stat().st_size <= MAX_FILE_BYTES else rel
        if digest in first:
            skipped.append((rel, f"duplicate: the same file as {first[digest]}"))
        else:
            first[digest] = rel
            photos.append(rel)
    return photos, sorted(skipped)


def bank_batch(batch: tuple[int, list[str]], *, root: str, max_pixels: int, out_dir: str,
               predictor_path: str | None = None) -> list[dict]:
    """Cut the masks of one batch of photos (``(batch number, files)``); write its kept entries to
    out_dir/bank-<number>.tar; one row per file (with a contact-sheet thumbnail, ``_thumb``)."""
    number, files = batch
    builder = _builder(predictor_path)
    rows, samples = [], []
    for i, rel in enumerate(files):
        row = {"source": rel, "status": "rejected", "reason": "", "entry": "", **{k: None for k in SCORE_NAMES}}
        rows.append(row)
        path = Path(root) / rel
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            row["reason"] = f"file too large ({size} bytes > {MAX_FILE_BYTES})"
            continue
        checked = check_image(path.read_bytes(), max_pixels=max_pixels)
        rgb = decode_rgb(checked.data) if checked.status == "accepted" else None
        if rgb is None:
            row["reason"] = checked.reason or "not decodable"
            continue
        key = f"{number:05d}{i:03d}"
        e = builder.entry(rgb, source=rel, index=int(key))
        row.update(reason=e.reason, **e.scores)
        row["_thumb"] = encode_png(fit_tile(e.photo_cut if e.photo_cut is not None else rgb, THUMB))
        if e.kept:
            row.update(status="kept", entry=key)
            samples.append((key, {"png": encode_png(e.template.rgba), "json": dumps_json(
                {"source": rel, "scores": e.scores,
                 "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in e.landmarks]})}))
    if samples:
        write_chunk(Path(out_dir) / f"bank-{number:05d}.tar", samples)
    return rows


def reason_key(reason: str) -> str:
    """A rejection's kind, without its numbers: "face too small (eyes 20 px ...)" -> "face too small"."""
    return re.split(r"[(:;]", reason, maxsplit=1)[0].strip()


def entry_tile(template: Template, side: int) -> np.ndarray:
    """A bank entry composited over mid grey (its alpha shows as the cut's outline)."""
    rgba = template.rgba.astype(np.float32)
    a = rgba[..., 3:] / 255.0
    return fit_tile(np.clip(rgba[..., :3] * a + 128.0 * (1 - a) + 0.5, 0, 255).astype(np.uint8), side)


def run_mask_bank(*, params: MaskBankParams, compute: ComputeParams, out_dir: str | Path,
                  landmarks_dat: str | None = None, landmarks_sha256: str | None = None) -> dict:
    """Build the bank from ``params.path`` into out_dir: entries/, status.parquet, summary.json,
    contact_sheet.png (kept entries: the photo with its cut, the entry) and rejects.png (per
    reason, photos with the cut that failed). ``landmarks_*``: the mask stage's predictor."""
    predictor_path = str(check_predictor(landmarks_dat, landmarks_sha256))  # fail before any work
    root, out_dir = Path(params.path), Path(out_dir)
    photos, skipped = list_photos(root)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "entries").mkdir(parents=True)
    batches = [(n, photos[i:i + BATCH]) for n, i in enumerate(range(0, len(photos), BATCH))]
    results = iter_chunks(bank_batch, batches, compute, desc="mask bank", root=str(root),
                          max_pixels=params.max_pixels, out_dir=str(out_dir / "entries"),
                          predictor_path=predictor_path)
    reasons: Counter = Counter()
    kept_scores: dict[str, list[float]] = {k: [] for k in SCORE_NAMES}
    sheet_kept = SmallestK(params.contact_sheet_entries)
    sheet_rejected: dict[str, SmallestK] = {}
    n_in = n_kept = 0
    with StatusWriter(out_dir / "status.parquet", STATUS_SCHEMA) as status:
        for (_, files), rows in zip(batches, results):
            if [r["source"] for r in rows] != files:
                raise MaskBankError(f"a batch of {len(files)} photos came back with {len(rows)} rows")
            for r in rows:
                n_in += 1
                thumb = r.pop("_thumb", None)
                if r["status"] == "kept":
                    n_kept += 1
                    for k in SCORE_NAMES:
                        kept_scores[k].append(r[k])
                    sheet_kept.add(rank_key(0, r["source"]), (r["entry"], r["source"], thumb))
                else:
                    reasons[reason_key(r["reason"])] += 1
                    if thumb is not None:
                        sheet_rejected.setdefault(reason_key(r["reason"]), SmallestK(4)).add(
                            rank_key(0, r["source"]), thumb)
            status.write(rows)
        skipped_rows = [{"source": rel, "status": "rejected", "reason": why, "entry": "",
                         **{k: None for k in SCORE_NAMES}} for rel, why in skipped]
        status.write(skipped_rows)
    for r in skipped_rows:
        reasons[reason_key(r["reason"])] += 1
    n_in += len(skipped_rows)
    if n_in != n_kept + sum(reasons.values()):
        raise MaskBankError(f"{n_in} files in, {n_kept} kept + {sum(reasons.values())} rejected")
    record_chunks(out_dir / "entries")
    summary = {
        "source": params.path, "source_found": root.is_dir(), "inputs": n_in, "kept": n_kept,
        "rejected": n_in - n_kept, "kept_share": round(n_kept / max(n_in, 1), 6),
        "rejection_reasons": dict(sorted(reasons.items())),
        "kept_score_medians": {k: round(float(np.median(v)), 4) for k, v in kept_scores.items() if v},
    }
    if not n_kept:
        summary["note"] = (f"no bank entries ({'no photos in' if root.is_dir() else 'no folder at'} {params.path}): "
                           "the mask stage has procedural masks only (type_weights.real must stay 0)")
    write_json(out_dir / "summary.json", summary)
    write_png(out_dir / "contact_sheet.png", _kept_sheet(sheet_kept.items(), out_dir / "entries"))
    write_png(out_dir / "rejects.png", draw_sheet(
        [[(f"{why}: {reasons[why]} photos", [decode_rgb(t) for t in k.items()])] for why, k in sorted(sheet_rejected.items())],
        THUMB, font_scale=0.36))
    return summary


def _kept_sheet(picks: list[tuple[str, str, bytes]], entries_dir: Path) -> np.ndarray:
    """Four cells a row: the photo with its cut outlined, beside the entry in the template frame."""
    bank = {key: t for key, t in zip(*_read_entries(entries_dir))}
    cells = [(source[-30:], [decode_rgb(thumb), entry_tile(bank[key], THUMB)])
             for key, source, thumb in picks if key in bank]
    return draw_sheet([cells[i:i + 4] for i in range(0, len(cells), 4)], THUMB, font_scale=0.3)


def _read_entries(entries_dir: Path) -> tuple[list[str], list[Template]]:
    keys, templates = [], []
    for chunk in list_chunks(entries_dir):
        for key, members in read_chunk(chunk):
            rgba = decode_rgba(members.get("png", b""))
            try:
                meta = json.loads(members.get("json", b"{}"))
            except ValueError:
                meta = None
            if rgba is None or not isinstance(meta, dict) or not isinstance(meta.get("source"), str):
                raise MaskBankError(f"{chunk.name}: entry {key} has no RGBA png or no json with its source")
            if rgba.shape[:2] != (SIZE[1], SIZE[0]):
                raise MaskBankError(f"{chunk.name}: entry {key} is {rgba.shape[1]}x{rgba.shape[0]}, "
                                    f"not the templates' frame {SIZE[0]}x{SIZE[1]}")
            keys.append(key)
            templates.append(Template(rgba=rgba, anchors=canonical_anchors().copy(), mask_type=BANK_MASK_TYPE,
                                      colour="photo", texture=meta["source"], variant=int(key)))
    return keys, templates


_BANKS: dict[tuple[str, str], list[Template]] = {}


def load_bank(bank_dir: str | Path) -> list[Template]:
    """The bank's entries as templates, in key order (cached per process by the entries' digest)."""
    entries = Path(bank_dir) / "entries"
    manifest = entries / "chunks.json"
    digest = manifest.read_text() if manifest.is_file() else ""
    key = (str(entries), digest)
    if key not in _BANKS:
        if not entries.is_dir():
            raise MaskBankError(f"no mask bank at {bank_dir} (run the mask_bank stage)")
        _BANKS.clear()
        _BANKS[key] = _read_entries(entries)[1]
    return _BANKS[key]


def photos_in_bank(bank_dir: str | Path) -> set[str]:
    """The source photos (relative to mask_bank.path) whose mask is an entry of the bank, and the
    byte-copies of them it skipped as duplicates: what a measure on real masked photos must leave
    out once a model trained on bank masks (scripts/identify_strangers.py). Empty without a bank."""
    if not (Path(bank_dir) / "status.parquet").is_file():
        return set()
    rows = status_rows(bank_dir)
    kept = {r["source"] for r in rows if r["status"] == "kept"}
    prefix = "duplicate: the same file as "
    return kept | {r["source"] for r in rows if r["reason"].startswith(prefix) and r["reason"][len(prefix):] in kept}


def link_source(dest: str | Path, source: str | None) -> str:
    """``make data``: link ``source`` (a folder of real masked photos) at ``dest``, or, with none,
    make ``dest`` an empty folder (the bank is then empty). Never replaces a folder that is not a
    link: a user's own photos there are used as they are. Returns what was done."""
    dest = Path(dest)
    if source:
        src = Path(source).expanduser().resolve()
        if not src.is_dir():
            raise MaskBankError(f"MASK_BANK_SOURCE={source}: not a folder")
        if dest.is_symlink():
            if dest.resolve() == src:
                return f"{dest} -> {src} (already linked)"
            dest.unlink()
        elif dest.exists():
            if any(dest.iterdir()):
                return f"{dest} holds photos already: used as they are (MASK_BANK_SOURCE={source} not linked)"
            dest.rmdir()  # the empty folder this function made when no source was set
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(src, target_is_directory=True)
        return f"{dest} -> {src}"
    if dest.exists() or dest.is_symlink():
        return f"{dest}: used as it is"
    dest.mkdir(parents=True)
    return (f"{dest}: made empty (no MASK_BANK_SOURCE): the mask bank will be empty and masks procedural "
            "only; set MASK_BANK_SOURCE to a folder of real masked photos (e.g. RMFD) and run `make data`")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Link the mask bank's photo folder (make data).")
    ap.add_argument("--dest", default="data/sources/rmfd")
    ap.add_argument("--source", default=os.environ.get("MASK_BANK_SOURCE") or None)
    args = ap.parse_args()
    try:
        print(link_source(args.dest, args.source))
    except MaskBankError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
