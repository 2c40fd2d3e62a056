"""`python -m pipeline.embed <folder> --model models/model.pt --out embeddings.parquet`

Embeds every face photo under a folder (any depth; masked or not) with the trained model. Each
photo is vetted, aligned on its own (standalone mode: the routes of params.yaml's `standalone`
section, RetinaFace first, which finds real masked faces), then embedded. Every file gets a row:
photos that cannot be read or aligned are kept with status "rejected" and the reason, so nothing
disappears silently. ``--sheet sheet.png`` draws every aligned crop with its route: what the model saw.

Output parquet columns: path (relative to the folder), identity (first folder below the root, or
the file name for a flat folder), status, reason, route, embedding (L2-normalised float32, null
when rejected). The schema metadata records the embedder, so `identify` refuses to compare
embeddings of different models.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pydantic import ValidationError

from pipeline.config import STANDALONE_ROUTES, StandaloneParams, load_params
from pipeline.recognition.embedders import Embedder, make_embedder
from pipeline.data.ingest import walk_source
from pipeline.data.tar_chunks import file_sha256

SCHEMA = pa.schema([("path", pa.string()), ("identity", pa.string()), ("status", pa.string()),
                    ("reason", pa.string()), ("route", pa.string()),
                    ("embedding", pa.list_(pa.float32()))])


def identity_of(rel_path: str) -> str:
    """``Name/Name_0001.jpg`` -> ``Name``; a photo directly in the root is its own identity."""
    parts = rel_path.replace(os.sep, "/").split("/")
    return parts[0] if len(parts) > 1 else os.path.splitext(parts[0])[0]


def embedder_info(embedder: Embedder, model: str, flip: bool) -> dict:
    info = dict(embedder.describe(), flip=bool(flip))
    # an ONNX export shares the thresholds of the checkpoint it was checked against (pipeline.recognition.export)
    info["model_sha256"] = "dlib" if model == "dlib" else getattr(embedder, "source_sha256", None) or file_sha256(model)
    return info


def embed_paths(root: Path, rel_paths: list[str], *, embedder: Embedder, flip: bool = False,
                batch_size: int = 64, standalone: StandaloneParams | None = None,
                sheet: str | Path | None = None) -> pa.Table:
    """Align (to the embedder's crop template) and embed the given files (relative to root); one
    row each, in the given order. ``sheet``: also draw the aligned crops into that PNG."""
    from pipeline.align.detection import align_file

    rows, crops, crop_rows = [], [], []
    for rel in tqdm(rel_paths, desc="align", unit="img", disable=len(rel_paths) < 2):
        crop, route, reason = align_file(root / rel, standalone=standalone, template=embedder.template)
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
    if sheet is not None:
        write_sheet(sheet, [(crops[k], f"{rows[i]['path']}\n{rows[i]['route']}") for k, i in enumerate(crop_rows)],
                    rejected=[r["path"] for r in rows if r["status"] == "rejected"])
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_sheet(path: str | Path, tiles: list[tuple[np.ndarray, str]], *, rejected: list[str] = (),
                columns: int = 8) -> None:
    """A contact sheet PNG: each aligned crop captioned with its file and route; the files that
    could not be aligned are listed below, so the sheet accounts for every photo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(tiles))
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.25 * rows + 0.3 + 0.18 * min(len(rejected), 20)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (crop, caption) in zip(axes.ravel(), tiles):
        ax.imshow(crop)
        ax.set_title(caption if len(caption) < 60 else "..." + caption[-57:], fontsize=6)
    note = f"{len(tiles)} aligned"
    if rejected:
        shown = list(rejected[:20]) + ([f"... and {len(rejected) - 20} more"] if len(rejected) > 20 else [])
        note += f", {len(rejected)} not aligned: " + "; ".join(shown)
    fig.text(0.01, 0.005, note, fontsize=7, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.02 + 0.012 * min(len(rejected), 20), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def embed_folder(folder: str | Path, *, model: str, flip: bool = False, batch_size: int = 64,
                 standalone: StandaloneParams | None = None, device: str = "cpu",
                 sheet: str | Path | None = None, embedder: Embedder | None = None) -> pa.Table:
    """Every file under ``folder`` (sorted, recursive, links as ingest takes them) -> one row, and one
    rejected row per link not taken; metadata names the embedder (``embedder``: the one already
    loaded for ``model``)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    files, links_not_taken = walk_source(root)
    if not files:
        raise ValueError(f"{root}: no files found")
    embedder = embedder or make_embedder(model, device=device)
    table = embed_paths(root, files, embedder=embedder, flip=flip, batch_size=batch_size,
                        standalone=standalone, sheet=sheet)
    if links_not_taken:  # one rejected row each, as ingest reports them, sorted in by path
        rows = table.to_pylist() + [{"path": rel, "identity": identity_of(rel), "status": "rejected", "reason": reason,
                                     "route": "link", "embedding": None} for rel, reason in links_not_taken]
        table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["path"]), schema=SCHEMA)
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
    ap.add_argument("--params", default="params.yaml",
                    help="its `standalone` section sets the alignment routes (built-in defaults when the file is absent)")
    ap.add_argument("--routes", help="override the alignment routes, comma-separated, tried in order: "
                                     + ", ".join(STANDALONE_ROUTES) + " (dlib_cnn: slow, ~1 s per photo)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def standalone_params(args: argparse.Namespace) -> StandaloneParams:
    """The `standalone` section of --params (defaults when there is no such file), with --routes."""
    params = load_params(args.params).standalone if Path(args.params).is_file() else StandaloneParams()
    if args.routes:
        try:
            params = StandaloneParams(**{**params.model_dump(), "routes": [r.strip() for r in args.routes.split(",")]})
        except ValidationError as err:
            raise ValueError(f"--routes {args.routes!r}: allowed routes are {', '.join(STANDALONE_ROUTES)} "
                             f"(distinct, at least one)") from err
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.embed", description=__doc__.split("\n\n")[1])
    ap.add_argument("folder", help="folder of face photos (searched recursively)")
    ap.add_argument("--out", required=True, help="output .parquet")
    ap.add_argument("--sheet", help="also write a contact sheet PNG of the aligned crops, each with its route")
    add_model_args(ap)
    args = ap.parse_args(argv)
    from pipeline.devices import select_device

    try:
        table = embed_folder(args.folder, model=args.model, flip=args.flip, batch_size=args.batch_size,
                             standalone=standalone_params(args), device=str(select_device(args.device)),
                             sheet=args.sheet)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    print(json.dumps(dict(summary(table), out=str(args.out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
