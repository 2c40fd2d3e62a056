"""`python -m pipeline.identify <probe photo> --gallery <folder | embeddings.parquet> --top-k 5`

Who is this, or nobody we know? An access-control check: the enrolled people are a folder laid out
``<identity>/<photos>`` (or flat ``<identity>.jpg``), embedded on the fly, or a parquet written by
`python -m pipeline.embed`; each identity is enrolled as the mean of its photos' embeddings. The
probe (masked or not) is aligned and embedded like `embed` does, compared by cosine similarity,
and gets the top-k identities with their scores AND a decision: the best identity when its score
is above the threshold, else "unknown". The threshold is the one for a target false-positive
identification rate at this gallery's size (``--fpir``, default 1e-2: the share of strangers'
searches that return somebody), set on people no choice was tested on with this same enrolment
(:mod:`pipeline.evaluate.thresholds`): validation/thresholds.json from the validate stage (masked probes,
synthetic masks), or a file `python -m pipeline.calibrate` wrote from the deployer's own labelled
photos; always for that very model (checked by its sha256). ``--threshold`` sets one by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import StandaloneParams
from pipeline.embed import (add_model_args, embed_folder, embed_paths, embedder_info, standalone_params,
                            table_embedder)
from pipeline.recognition.embedders import Embedder, make_embedder
from pipeline.metrics import enrol
from pipeline.evaluate.thresholds import ThresholdError, describe, find_entry, threshold_for

UNKNOWN = "unknown"
DEFAULT_FPIR = "1e-2"
DEFAULT_THRESHOLDS = "validation/thresholds.json"


class GalleryError(ValueError):
    pass


def load_gallery(gallery: str | Path, *, model: str, flip: bool, device: str,
                 standalone: StandaloneParams | None = None, embedder: Embedder | None = None):
    """(identities, unit templates, embedder info, photos enrolled per identity)."""
    gallery = Path(gallery)
    if gallery.is_dir():
        table = embed_folder(gallery, model=model, flip=flip, device=device, standalone=standalone,
                             embedder=embedder)
    elif gallery.is_file() and gallery.suffix == ".parquet":
        table = pq.read_table(gallery)
    else:
        raise GalleryError(f"--gallery must be a folder of photos or a .parquet from pipeline.embed: {gallery}")
    t = table.filter(table.column("status").to_numpy(zero_copy_only=False) == "embedded")
    if t.num_rows == 0:
        raise GalleryError(f"{gallery}: no photo could be aligned and embedded")
    idents = t.column("identity").to_pylist()
    names, templates = enrol(idents, np.array(t.column("embedding").to_pylist(), dtype=np.float32))
    return names, templates, table_embedder(table), {n: idents.count(n) for n in names}


def rank_identities(probe: np.ndarray, names: list[str], templates: np.ndarray, top_k: int):
    """[(identity, cosine score)] best first; ties broken by name for a stable order."""
    scores = templates @ probe
    return sorted(zip(names, scores.tolist()), key=lambda kv: (-kv[1], kv[0]))[:top_k]


def identify(probes: list[str], *, gallery: str, model: str, top_k: int = 5, flip: bool = False,
             device: str = "cpu", standalone: StandaloneParams | None = None, threshold: float | None = None,
             fpir: str = DEFAULT_FPIR, thresholds_path: str | Path = DEFAULT_THRESHOLDS) -> list[dict]:
    embedder = make_embedder(model, device=device)
    info = embedder_info(embedder, model, flip)
    try:
        entry = None if threshold is not None else find_entry(thresholds_path, info)
    except ThresholdError as e:
        raise GalleryError(str(e)) from e
    names, templates, gal_info, photos = load_gallery(gallery, model=model, flip=flip, device=device,
                                                      standalone=standalone, embedder=embedder)
    if entry is not None:
        try:
            threshold, _, _ = threshold_for(entry, fpir, len(names))
            meaning = describe(entry, fpir, len(names))
        except ThresholdError as e:
            raise GalleryError(f"{thresholds_path}: {e}") from e
    else:
        meaning = f"threshold {threshold:.4f}: set by hand"
    for key in ("model_sha256", "flip", "template"):
        if gal_info.get(key) != info.get(key):
            raise GalleryError(f"{gallery} was embedded with {key}={gal_info.get(key)!r}, the probe "
                               f"with {info.get(key)!r}: re-embed the gallery with the same model")
    # every probe aligned, then embedded in batches (paths as given: relative to the working folder)
    rows = embed_paths(Path("."), [str(p) for p in probes], embedder=embedder, flip=flip,
                       standalone=standalone).to_pylist()
    out = []
    for p, row in zip(probes, rows):
        result = {"probe": str(p), "status": row["status"], "route": row["route"], "reason": row["reason"],
                  "threshold": round(threshold, 4), "gallery_size": len(names), "threshold_means": meaning}
        if row["embedding"] is not None:
            ranked = rank_identities(np.array(row["embedding"], np.float32), names, templates, top_k)
            result["matches"] = [{"identity": n, "score": round(float(s), 4), "photos": photos[n]} for n, s in ranked]
            best, score = ranked[0]
            result["decision"] = best if score > threshold else UNKNOWN
        out.append(result)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.identify", description=__doc__.split("\n\n")[1])
    ap.add_argument("probe", nargs="+", help="probe photo(s)")
    ap.add_argument("--gallery", required=True, help="folder <identity>/<photos>, or embeddings .parquet")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--fpir", default=DEFAULT_FPIR, help="target false-positive identification rate at this gallery's "
                                                         "size (the share of strangers let in): 1e-2 | 1e-1")
    ap.add_argument("--thresholds", default=DEFAULT_THRESHOLDS,
                    help="1:N thresholds: the validate stage's, or one pipeline.calibrate wrote from your photos")
    ap.add_argument("--threshold", type=float, help="decide at this cosine score instead (overrides --fpir)")
    ap.add_argument("--json", action="store_true", help="print JSON (one object per probe) instead of a table")
    add_model_args(ap)
    args = ap.parse_args(argv)
    from pipeline.devices import select_device

    missing = [p for p in args.probe if not Path(p).is_file()]
    if missing:
        print(f"error: probe not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        results = identify(args.probe, gallery=args.gallery, model=args.model, top_k=args.top_k,
                           flip=args.flip, device=str(select_device(args.device)),
                           standalone=standalone_params(args), threshold=args.threshold, fpir=args.fpir,
                           thresholds_path=args.thresholds)
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
                continue
            print(f"  decision: {r['decision']}  ({r['threshold_means']})")
            for k, m in enumerate(r["matches"], start=1):
                print(f"  {k}. {m['identity']:<40s} {m['score']:.4f}")
    return 0 if all("matches" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
