"""`python -m pipeline.calibrate <folder> --out my_thresholds.json`: 1:N thresholds from your own photos.

Thresholds set on synthetic masks do not carry to real ones, so a deployer calibrates on labelled
photos of their own: a folder ``<identity>/<photos>`` (masked or not, as the door will see them;
the folder named by each photo's parent is its identity). Every photo is aligned and embedded as
`identify` does, people with >= 2 photos enrol the mean template of a seeded half of them, the
other photos search as mated probes, and every person searches as a stranger against everybody
else (:mod:`pipeline.evaluate.thresholds`). Written: the thresholds per FPIR target and gallery size that
`identify --thresholds <out>` then uses, and at this folder's own gallery size the FPIR and FNIR
measured, each with a bootstrap interval over people. A photo that cannot be aligned is counted
with its reason in the entry, never dropped silently; the command refuses when none can be.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.embed import add_model_args, embed_folder, embedder_info, standalone_params, summary
from pipeline.recognition.embedders import make_embedder
from pipeline.evaluate.thresholds import ThresholdError, calibrate, write_entry


def calibrate_folder(folder: str | Path, *, model: str, flip: bool = False, device: str = "cpu", seed: int = 0,
                     replicates: int = 1000, standalone=None, batch_size: int = 64) -> dict:
    """The thresholds entry for ``model`` from the labelled photos under ``folder``."""
    embedder = make_embedder(model, device=device)
    table = embed_folder(folder, model=model, flip=flip, batch_size=batch_size, standalone=standalone,
                         device=device, embedder=embedder)
    t = table.to_pydict()
    keep = [i for i, s in enumerate(t["status"]) if s == "embedded"]
    if not keep:
        raise ThresholdError(f"{folder}: no photo could be aligned and embedded")
    ids = [t["identity"][i] for i in keep]
    emb = np.array([t["embedding"][i] for i in keep], np.float32)
    block = calibrate(emb, emb, ids, seed=seed, replicates=replicates, probes="the folder's photos as they are",
                      source=f"{Path(folder).name}/ ({len(set(ids))} people, {len(ids)} photos)")
    s = summary(table)
    block["photos"] = s["files"]
    block["photos_not_embedded"] = s["rejected"]
    block["not_embedded_reasons"] = s["rejection_reasons"]
    if s["files"] != s["embedded"] + s["rejected"]:
        raise ThresholdError(f"{folder}: {s['files']} files but {s['embedded']} embedded + {s['rejected']} rejected")
    return {**{k: v for k, v in embedder_info(embedder, model, flip).items()
               if k in ("model_sha256", "template", "flip")}, "one_to_n": block}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.calibrate", description=__doc__.split("\n\n")[1])
    ap.add_argument("folder", help="labelled photos: <identity>/<photos>")
    ap.add_argument("--out", required=True, help="thresholds file to write (an entry per model; others are kept)")
    ap.add_argument("--seed", type=int, default=0, help="which photos of each person are enrolled")
    ap.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates of the intervals")
    add_model_args(ap)
    args = ap.parse_args(argv)
    from pipeline.devices import select_device

    try:
        entry = calibrate_folder(args.folder, model=args.model, flip=args.flip, device=str(select_device(args.device)),
                                 seed=args.seed, replicates=args.replicates, standalone=standalone_params(args),
                                 batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    key = "dlib" if args.model == "dlib" else f"model:{entry['model_sha256'][:12]}"
    write_entry(args.out, key, entry)
    block = entry["one_to_n"]
    print(json.dumps({"people": block["people"], "photos_not_embedded": block["photos_not_embedded"],
                      "at_gallery_size": block["at_gallery_size"], "written": args.out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
