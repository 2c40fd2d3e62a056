"""`python -m pipeline.embed <folder> --model models/model.pt --out embeddings.parquet`

Embeds every face photo under a folder (any depth; masked or not) with the trained model. Each
photo is vetted, aligned on its own (standalone mode: Haar face + eyes, else dlib; the eyes stay
visible above a mask), then embedded. Every file gets a row: photos that cannot be read or aligned
are kept with status "rejected" and the reason, so nothing disappears silently.

Output parquet columns: path (relative to the folder), identity (first folder below the root, or
the file name for a flat folder), status, reason, route, embedding (L2-normalised float32, null
when rejected). The schema metadata records the embedder, so `identify` refuses to compare
embeddings of different models.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pipeline.align.geometry import ARCFACE_112, Template
from pipeline.embedders import Embedder, make_embedder
from pipeline.image_check import check_image
from pipeline.ingest import IMAGE_EXTENSIONS, _walk_files
from pipeline.tar_chunks import file_sha256

SCHEMA = pa.schema([("path", pa.string()), ("identity", pa.string()), ("status", pa.string()),
                    ("reason", pa.string()), ("route", pa.string()),
                    ("embedding", pa.list_(pa.float32()))])


def identity_of(rel_path: str) -> str:
    """``Name/Name_0001.jpg`` -> ``Name``; a photo directly in the root is its own identity."""
    parts = rel_path.replace(os.sep, "/").split("/")
    return parts[0] if len(parts) > 1 else os.path.splitext(parts[0])[0]


def load_rgb(path: Path) -> tuple[np.ndarray | None, str]:
    """(RGB uint8 array, "") or (None, reason) for anything that is not a usable photo."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, f"unreadable: {err}"
    checked = check_image(raw)
    if checked.status != "accepted":
        return None, checked.reason
    with Image.open(io.BytesIO(checked.data)) as im:
        return np.asarray(im.convert("RGB")), ""


def align_file(path: Path, *, use_cnn: bool = False, template: Template = ARCFACE_112) -> tuple[np.ndarray | None, str, str]:
    """(crop on ``template`` or None, route, reason)."""
    from pipeline.align.detection import align_standalone

    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return None, "none", f"unsupported extension {path.suffix or '(none)'}; allowed: {sorted(IMAGE_EXTENSIONS)}"
    image, reason = load_rgb(path)
    if image is None:
        return None, "none", reason
    res = align_standalone(image, use_cnn=use_cnn, template=template)
    return res.crop, res.route, res.reason


def embedder_info(embedder: Embedder, model: str, flip: bool) -> dict:
    info = dict(embedder.describe(), flip=bool(flip))
    info["model_sha256"] = "dlib" if model == "dlib" else file_sha256(model)
    return info


def embed_paths(root: Path, rel_paths: list[str], *, embedder: Embedder, flip: bool = False,
                batch_size: int = 64, use_cnn: bool = False) -> pa.Table:
    """Align (to the embedder's crop template) and embed the given files (relative to root); one
    row each, in the given order."""
    rows, crops, crop_rows = [], [], []
    for rel in tqdm(rel_paths, desc="align", unit="img", disable=len(rel_paths) < 2):
        crop, route, reason = align_file(root / rel, use_cnn=use_cnn, template=embedder.template)
        rows.append({"path": rel.replace(os.sep, "/"), "identity": identity_of(rel),
                     "status": "rejected" if crop is None else "embedded", "reason": reason,
                     "route": route, "embedding": None})
        if crop is not None:
            crop_rows.append(len(rows) - 1)
            crops.append(crop)
    if crops:
        emb = embedder.embed(np.stack(crops), flip=flip, batch_size=batch_size,
                             progress="embed" if len(crops) > batch_size else None)
        for i, e in zip(crop_rows, emb):
            rows[i]["embedding"] = e.tolist()
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def embed_folder(folder: str | Path, *, model: str, flip: bool = False, batch_size: int = 64,
                 use_cnn: bool = False, device: str = "cpu") -> pa.Table:
    """Every file under ``folder`` (sorted, recursive) -> one row; metadata names the embedder."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    files = _walk_files(root)
    if not files:
        raise ValueError(f"{root}: no files found")
    embedder = make_embedder(model, device=device)
    table = embed_paths(root, files, embedder=embedder, flip=flip, batch_size=batch_size, use_cnn=use_cnn)
    meta = embedder_info(embedder, model, flip)
    return table.replace_schema_metadata({"embedder": json.dumps(meta, sort_keys=True)})


def table_embedder(table: pa.Table) -> dict:
    return json.loads((table.schema.metadata or {}).get(b"embedder", b"{}"))


def summary(table: pa.Table) -> dict:
    status = table.column("status").to_pylist()
    routes: dict[str, int] = {}
    for r, s in zip(table.column("route").to_pylist(), status):
        if s == "embedded":
            routes[r] = routes.get(r, 0) + 1
    reasons: dict[str, int] = {}
    for r, s in zip(table.column("reason").to_pylist(), status):
        if s == "rejected":
            reasons[r] = reasons.get(r, 0) + 1
    return {"files": table.num_rows, "embedded": status.count("embedded"),
            "rejected": status.count("rejected"), "routes": routes, "rejection_reasons": reasons}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="models/model.pt",
                    help="trained checkpoint (default models/model.pt), or 'dlib' for the reference network")
    ap.add_argument("--flip", action="store_true", help="flip-averaged embeddings")
    ap.add_argument("--cnn", action="store_true", help="try dlib's CNN face detector when the others fail (slow)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.embed", description=__doc__.split("\n\n")[1])
    ap.add_argument("folder", help="folder of face photos (searched recursively)")
    ap.add_argument("--out", required=True, help="output .parquet")
    add_model_args(ap)
    args = ap.parse_args(argv)
    from pipeline.devices import select_device

    try:
        table = embed_folder(args.folder, model=args.model, flip=args.flip, batch_size=args.batch_size,
                             use_cnn=args.cnn, device=str(select_device(args.device)))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    print(json.dumps(dict(summary(table), out=str(args.out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
