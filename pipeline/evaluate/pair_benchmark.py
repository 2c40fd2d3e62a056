"""Pair benchmarks from outside: a folder of photos + an LFW-format pairs file, scored like LFW.

``params.yaml`` ``pair_benchmarks: {<name>: {path, pairs}}`` -> DVC stage ``pair_benchmark@<name>``
-> ``eval/benchmarks/<name>/metrics.json`` (in ``dvc metrics show / diff``) and
``photos.parquet`` (every photo the pairs name: aligned, or why not).

- The pairs file is read as LFW's (:func:`pipeline.data.protocols.parse_pairs`): ``N`` then N same +
  N different pairs, cut into ``evaluate.n_folds`` balanced folds, or ``SETS N`` with each set a
  fold. A photo is ``<path>/<name>/<name>_<NNNN>`` with a .jpg, .jpeg or .png suffix.
- Each photo is aligned on its own, as `identify` aligns a photo (the ``standalone`` routes:
  RetinaFace first, which finds faces behind real masks), once, then embedded by the model and by
  dlib's network (the reference) on the same crops.
- A pair with a photo that is missing or cannot be aligned is an error of the system, never
  dropped: ``accuracy`` counts it wrong whatever its label; ``accuracy_aligned`` is the same
  10-fold accuracy over the pairs whose two photos aligned, ``pairs_failed`` and the reasons say how
  many were not. AUC, EER and TAR@FAR (only where impostors x FAR >= 10) are on the aligned pairs.
- Intervals: a bootstrap over identities (a pair belongs to its first photo's person), the
  thresholds chosen again in every replicate; model - dlib paired on the same draws.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.bootstrap import draw_identities, interval, paired_difference, replicate
from pipeline.config import EvaluateParams, PairBenchmarkParams, StandaloneParams
from pipeline.recognition.embedders import Embedder, make_embedder
from pipeline.metrics import FAR_TARGETS, kfold_correct, tar_key, verification_metrics
from pipeline.data.protocols import Pairs, parse_pairs
from pipeline.data.tar_chunks import write_json

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_PAIRS_FILE_BYTES = 64 << 20  # a pairs file is text: bigger is refused before reading
PHOTOS_SCHEMA = pa.schema([("image_id", pa.string()), ("file", pa.string()), ("status", pa.string()),
                           ("route", pa.string()), ("reason", pa.string())])


class PairBenchmarkError(ValueError):
    pass


def read_pairs(path: str | Path, n_folds: int) -> Pairs:
    path = Path(path)
    if not path.is_file():
        raise PairBenchmarkError(f"pairs file {path} not found")
    if path.stat().st_size > MAX_PAIRS_FILE_BYTES:
        raise PairBenchmarkError(f"{path}: {path.stat().st_size} bytes, more than a pairs file holds "
                                 f"({MAX_PAIRS_FILE_BYTES})")
    return parse_pairs(path, n_folds=n_folds)


def photo_file(folder: Path, image_id: str) -> Path | None:
    """The photo of ``image_id`` (``name/name_NNNN``) under ``folder``, or None; a name that would
    lead outside the folder is refused."""
    root = folder.resolve()
    for suffix in PHOTO_SUFFIXES:
        p = (folder / f"{image_id}{suffix}").resolve()
        if root not in p.parents:
            raise PairBenchmarkError(f"pair names {image_id!r}, a path outside {folder}")
        if p.is_file():
            return p
    return None


def align_photos(folder: Path, image_ids: list[str], *, template, standalone: StandaloneParams | None):
    """({image_id: crop} of the photos that aligned, one status row per photo)."""
    from pipeline.align.detection import align_file

    crops, rows = {}, []
    for image_id in tqdm(image_ids, desc="align", unit="photo"):
        f = photo_file(folder, image_id)
        if f is None:
            rows.append({"image_id": image_id, "file": "", "status": "missing", "route": "",
                         "reason": f"no {image_id}{{{','.join(PHOTO_SUFFIXES)}}} under {folder}"})
            continue
        crop, route, reason = align_file(f, standalone=standalone, template=template)
        rows.append({"image_id": image_id, "file": str(f.relative_to(folder.resolve())),
                     "status": "aligned" if crop is not None else "unalignable", "route": route, "reason": reason})
        if crop is not None:
            crops[image_id] = crop
    return crops, rows


def score_benchmark(emb: dict[str, np.ndarray], pairs: Pairs, params: EvaluateParams, tag: str) -> tuple[dict, dict]:
    """Figures of one embedder (``emb``: image_id -> unit embedding of the photos that aligned)
    and their bootstrap replicates (for the paired difference)."""
    ok = np.array([a in emb and b in emb for a, b in zip(pairs.a, pairs.b)], bool)
    if not ok.any():
        raise PairBenchmarkError(f"{pairs.source}: no pair has both photos aligned")
    idx = np.flatnonzero(ok)
    scores = np.array([float(emb[pairs.a[i]] @ emb[pairs.b[i]]) for i in idx])
    same, fold = pairs.same[idx], pairs.fold[idx]
    out = verification_metrics(scores, same, fold)
    out["accuracy_aligned"] = out.pop("accuracy")
    out.pop("accuracy_std")
    out["accuracy"] = float(kfold_correct(scores, same, fold).sum() / len(pairs))
    out["pairs_scored"] = int(ok.sum())
    position = np.full(len(pairs), -1)
    position[idx] = np.arange(idx.size)
    fars = [f for f in FAR_TARGETS if out[tar_key(f)] is not None]

    def stat(draw: np.ndarray) -> dict:
        rows = position[draw][position[draw] >= 0]
        right = kfold_correct(scores[rows], same[rows], fold[rows])
        r = {"accuracy": right.sum() / draw.size, "accuracy_aligned": right.mean()}
        if fars:
            m = verification_metrics(scores[rows], same[rows], fold[rows])
            r.update({tar_key(f): m[tar_key(f)] for f in fars})
        return r

    who = [a.split("/", 1)[0] for a in pairs.a]
    reps = replicate(stat, draw_identities(who, replicates=params.bootstrap_replicates, seed=params.seed,
                                           tag=f"pair_benchmark:{tag}"))
    for k, v in reps.items():
        out[f"{k}_ci"] = interval(v, params.ci_level)
    out["bootstrap_identities"] = len(set(who))
    return out, reps


def run_pair_benchmark(*, name: str, benchmark: PairBenchmarkParams, evaluate: EvaluateParams,
                       standalone: StandaloneParams, model_path: str | Path, out_dir: str | Path,
                       device: str = "cpu") -> dict:
    """The pair_benchmark@<name> stage: metrics.json (model, dlib reference, paired differences)
    and photos.parquet (every photo the pairs name, its route or why it failed) in ``out_dir``."""
    pairs = read_pairs(benchmark.pairs, evaluate.n_folds)
    folder = Path(benchmark.path)
    if not folder.is_dir():
        raise PairBenchmarkError(f"pair_benchmarks.{name}.path: {folder} is not a folder")
    model: Embedder = make_embedder(str(model_path), device=device)
    image_ids = sorted(set(pairs.a) | set(pairs.b))
    crops, rows = align_photos(folder, image_ids, template=model.template, standalone=standalone)
    embedders = {"model": model}
    if evaluate.reference_dlib:
        embedders["dlib"] = make_embedder("dlib", device=device, template=model.template.name)
    ids = sorted(crops)
    stack = np.stack([crops[i] for i in ids]) if ids else None
    results = {}
    for key, e in embedders.items():
        vecs = e.embed(stack, flip=evaluate.flip, batch_size=evaluate.batch_size, progress=f"{name} {key}") \
            if stack is not None else np.zeros((0, e.dim), np.float32)
        results[key] = score_benchmark(dict(zip(ids, vecs)), pairs, evaluate, name)
    status = [r["status"] for r in rows]
    failed = {i for i in image_ids if i not in crops}
    reasons: dict[str, int] = {}
    for r in rows:
        if r["status"] != "aligned":
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    metrics = {"benchmark": name, "pairs": len(pairs), "pairs_same": int(pairs.same.sum()),
               "pairs_different": int((~pairs.same).sum()), "photos": len(image_ids),
               "photos_aligned": status.count("aligned"), "photos_missing": status.count("missing"),
               "photos_unalignable": status.count("unalignable"),
               "pairs_failed": int(sum(a in failed or b in failed for a, b in zip(pairs.a, pairs.b))),
               "failure_reasons": reasons, "model": results["model"][0]}
    if metrics["photos_aligned"] + metrics["photos_missing"] + metrics["photos_unalignable"] != len(image_ids):
        raise PairBenchmarkError("a photo has no status")
    if "dlib" in results:
        metrics["reference"] = {"dlib": results["dlib"][0]}
        metrics["vs_dlib"] = {}
        for k, v in results["model"][1].items():
            d = paired_difference(results["model"][0].get(k), results["dlib"][0].get(k), v, results["dlib"][1][k],
                                  evaluate.ci_level)
            if d is not None:
                metrics["vs_dlib"][k] = d
    from pipeline.evaluate.evaluation import round_metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PHOTOS_SCHEMA), out_dir / "photos.parquet")
    metrics = round_metrics(metrics)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
