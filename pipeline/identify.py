"""`python -m pipeline.identify <probe photo> --gallery <folder | embeddings.parquet> --top-k 5`

Who is this? The probe (masked or not) is aligned and embedded like `embed` does, then compared by
cosine similarity with an enrolled gallery: a folder laid out ``<identity>/<photos>`` (or flat
``<identity>.jpg``), embedded on the fly, or a parquet written by `python -m pipeline.embed`. An
identity scores the best of its photos. Prints the top-k identities with their scores.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.embed import add_model_args, embed_folder, embed_paths, embedder_info, table_embedder
from pipeline.embedders import make_embedder


class GalleryError(ValueError):
    pass


def load_gallery(gallery: str | Path, *, model: str, flip: bool, device: str, use_cnn: bool = False):
    """(identities, unit embeddings, embedder info) of every embedded gallery photo."""
    gallery = Path(gallery)
    if gallery.is_dir():
        table = embed_folder(gallery, model=model, flip=flip, device=device, use_cnn=use_cnn)
    elif gallery.is_file() and gallery.suffix == ".parquet":
        table = pq.read_table(gallery)
    else:
        raise GalleryError(f"--gallery must be a folder of photos or a .parquet from pipeline.embed: {gallery}")
    t = table.filter(table.column("status").to_numpy(zero_copy_only=False) == "embedded")
    if t.num_rows == 0:
        raise GalleryError(f"{gallery}: no photo could be aligned and embedded")
    emb = np.array(t.column("embedding").to_pylist(), dtype=np.float32)
    return t.column("identity").to_pylist(), emb, table_embedder(table)


def rank_identities(probe: np.ndarray, identities: list[str], gallery: np.ndarray, top_k: int):
    """[(identity, best cosine score)] best first; ties broken by name for a stable order."""
    scores = gallery @ probe
    best: dict[str, float] = {}
    for ident, s in zip(identities, scores.tolist()):
        best[ident] = max(best.get(ident, -np.inf), s)
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]


def identify(probes: list[str], *, gallery: str, model: str, top_k: int = 5, flip: bool = False,
             device: str = "cpu", use_cnn: bool = False) -> list[dict]:
    embedder = make_embedder(model, device=device)
    info = embedder_info(embedder, model, flip)
    names, gal, gal_info = load_gallery(gallery, model=model, flip=flip, device=device, use_cnn=use_cnn)
    for key in ("model_sha256", "flip", "template"):
        if gal_info.get(key) != info.get(key):
            raise GalleryError(f"{gallery} was embedded with {key}={gal_info.get(key)!r}, the probe "
                               f"with {info.get(key)!r}: re-embed the gallery with the same model")
    out = []
    for p in probes:
        path = Path(p)
        row = embed_paths(path.parent, [path.name], embedder=embedder, flip=flip,
                          use_cnn=use_cnn).to_pylist()[0]
        result = {"probe": str(p), "status": row["status"], "route": row["route"], "reason": row["reason"]}
        if row["embedding"] is not None:
            ranked = rank_identities(np.array(row["embedding"], np.float32), names, gal, top_k)
            result["matches"] = [{"identity": n, "score": round(float(s), 4)} for n, s in ranked]
        out.append(result)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.identify", description=__doc__.split("\n\n")[1])
    ap.add_argument("probe", nargs="+", help="probe photo(s)")
    ap.add_argument("--gallery", required=True, help="folder <identity>/<photos>, or embeddings .parquet")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_args(ap)
    args = ap.parse_args(argv)
    from pipeline.devices import select_device

    missing = [p for p in args.probe if not Path(p).is_file()]
    if missing:
        print(f"error: probe not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        results = identify(args.probe, gallery=args.gallery, model=args.model, top_k=args.top_k,
                           flip=args.flip, device=str(select_device(args.device)), use_cnn=args.cnn)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['probe']}  (alignment: {r['route']})")
            if "matches" not in r:
                print(f"  not identified: {r['reason']}")
            for k, m in enumerate(r.get("matches", []), start=1):
                print(f"  {k}. {m['identity']:<40s} {m['score']:.4f}")
    return 0 if all("matches" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
