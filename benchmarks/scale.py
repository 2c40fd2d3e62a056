"""Scale benchmark: ingest -> mask -> align -> pack -> 20 training steps on N simulated crops.

For each N (default 10k, 40k, 160k) it builds an insightface-style RecordIO set of N pre-aligned
112x112 crops (scripts/simulate_dataset.py from the train crops of an align output), then runs each
stage on it as the DVC pipeline would for an external set (``source: recordio``,
``assume_aligned: true``) and prints ONE JSON line per N: per stage the wall time, images/s, ms per
image (wall and CPU of the whole process tree) and the PARENT process's peak RSS.

Each stage runs in a fresh Python process (``--stage``), so its peak RSS (``ru_maxrss``: the exact
high-water mark, imports included; the workers it starts are other processes and excluded) is that
stage's alone, not what an earlier stage left in the allocator. ``parent_rss_start_mib`` is the
RSS after the imports, just before the stage starts. The worker pool is started first and each
worker imports the stage's code (mask: loads the landmark model), timed apart as ``warmup_s``: a
fixed cost of seconds that would otherwise read as a per-image cost falling with N.
``ms_per_image`` / ``images_per_s`` time the stage itself; ``cold_ms_per_image`` adds the warm-up. The acceptance ("bounded memory, linear
time"): from 10k to 160k images, per-image time of each stage flat within +-25% and each stage's
parent peak RSS at most 1.5x; a summary of those ratios goes to stderr.

Usage (from the project root):
    python benchmarks/scale.py [--n 10000 40000 160000] [--n-jobs 2] [--aligned data/lfw/aligned]
           [--work benchmarks/out/scale] [--keep]
``--aligned`` is any align-stage output with train chunks (the tiny test fixture's works; so does
the real align on a few hundred LFW train images). Simulated sets are kept between runs in
``<work>/N/rec`` (made again when the arguments change); stage outputs are deleted after each N
unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from benchmarks.measure import emit  # noqa: E402

STAGES = ("ingest", "mask", "align", "pack", "train")
PIPELINE_STAGES = STAGES[:-1]


def _rss_mib() -> float:
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _tree_cpu_s() -> float:
    """CPU seconds of this process, its live children and its reaped children."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------ one stage, one process

def _train_steps(work: Path, steps: int, params_path: str) -> dict:
    import torch

    from pipeline.config import load_params
    from pipeline.devices import select_device
    from pipeline.train.pair_loader import make_pair_loader
    from pipeline.pack.shards import read_shard_set
    from pipeline.train.pair_model import autocast_for, build_pair_model, train_step

    params = load_params(params_path).train
    device = select_device("cpu")
    shard_set = read_shard_set(work / "shards")
    shards = shard_set.train
    model, optimizer = build_pair_model(params, len(shard_set.classes), device, shard_set.template)
    model.train()
    loader = make_pair_loader(shards, batch_size=params.batch_size, augment=params.augment, seed=params.seed,
                              shuffle_buffer=params.shuffle_buffer, num_workers=params.num_workers,
                              drop_last=True)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches()
    autocast = autocast_for(device, params.bf16)
    train_step(model, optimizer, next(it), lr=params.lr, grad_clip=params.grad_clip, device=device,
               autocast=autocast)  # warm-up: loader workers start, allocator
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, next(it), lr=params.lr, grad_clip=params.grad_clip, device=device,
                   autocast=autocast)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": 2 * params.batch_size * steps, "classes": len(shard_set.classes),
            "batch_pairs": params.batch_size, "steps": steps}


def _warm(i: int, stage: str) -> int:
    """In a worker: import the stage's code and load what it loads once per process."""
    time.sleep(0.3)  # so that every worker gets one of these
    if stage == "mask":
        from pipeline.config import MaskParams
        from pipeline.mask.landmarks import check_predictor
        from pipeline.mask.stage import get_detector

        get_detector(str(check_predictor(None, None)), MaskParams(), True)
    elif stage == "align":
        import pipeline.align.stage  # noqa: F401
    elif stage == "ingest":
        import pipeline.data.ingest  # noqa: F401
    elif stage == "pack":
        import pipeline.pack.stage  # noqa: F401
    return os.getpid()


def run_stage(stage: str, work: Path, n_jobs: int, chunk_size: int, steps: int, params_path: str) -> dict:
    """Run one stage on ``work`` in this process (worker pool warmed first); its figures."""
    from pipeline.align.stage import run_align
    from pipeline.config import (AlignParams, ComputeParams, DatasetParams, IngestParams, MaskParams,
                                 PackParams)
    from pipeline.data.ingest import run_ingest
    from pipeline.mask.stage import run_mask
    from pipeline.pack.stage import run_pack

    from pipeline.parallel import map_chunks

    compute = ComputeParams(n_jobs=n_jobs)
    t0 = time.perf_counter()
    if stage != "train" and n_jobs > 1:
        map_chunks(_warm, range(2 * n_jobs), compute, desc="warm-up", stage=stage)
    warmup = time.perf_counter() - t0
    rss_start = _rss_mib()
    cpu0, t0 = _tree_cpu_s(), time.perf_counter()
    if stage == "ingest":
        s = run_ingest(params=IngestParams(chunk_size=chunk_size),
                       dataset=DatasetParams(source="recordio", path=str(work / "rec"), assume_aligned=True),
                       compute=compute, out_dir=work / "ingest")
        out = {"images": s["inputs"], "accepted": s["accepted"]}
    elif stage == "mask":
        s = run_mask(params=MaskParams(), compute=compute, in_dir=work / "ingest", out_dir=work / "masked",
                     assume_aligned=True)
        out = {"images": s["inputs"], "masked": s["masked"], "routes": s["routes"]}
    elif stage == "align":
        s = run_align(params=AlignParams(), compute=compute, ingest_dir=work / "ingest",
                      masked_dir=work / "masked", out_dir=work / "aligned", assume_aligned=True)
        out = {"images": s["inputs"], "aligned": s["aligned"]}
    elif stage == "pack":
        index = run_pack(params=PackParams(), aligned_dir=work / "aligned", out_dir=work / "shards",
                         compute=compute)
        out = {"images": index["aligned"], "train_pairs": index["train"]["samples"],
               "train_shards": len(index["train"]["shards"]), "buckets": index["train"]["buckets"],
               "val_pairs": index["val"]["samples"]}
    else:
        out = _train_steps(work, steps, params_path)
    seconds = out.pop("seconds", None) or time.perf_counter() - t0
    cpu = _tree_cpu_s() - cpu0
    n = out["images"]
    return {**out, "seconds": round(seconds, 2), "warmup_s": round(warmup, 2), "images_per_s": round(n / seconds, 1),
            "ms_per_image": round(1000 * seconds / n, 4), "cpu_ms_per_image": round(1000 * cpu / n, 4),
            "cold_ms_per_image": round(1000 * (seconds + warmup) / n, 4),
            "parent_peak_rss_mib": _peak_rss_mib(), "parent_rss_start_mib": rss_start}


# --------------------------------------------------------------------------------- orchestration

def make_source(aligned: Path, rec: Path, n: int, images_per_identity: int, seed: int) -> dict:
    """The simulated RecordIO set of ``n`` crops (reused when made with the same arguments)."""
    from pipeline.data import recordio
    from scripts.simulate_dataset import simulate

    marker = rec / "simulated.json"
    want = {"aligned": str(aligned.resolve()), "n": n, "images_per_identity": images_per_identity, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return want | {"reused": True}
    shutil.rmtree(rec, ignore_errors=True)
    t0 = time.perf_counter()
    samples = simulate(aligned, n, images_per_identity, seed)
    counts = recordio.write_insightface_rec(rec, ((label, jpg) for _, label, jpg in samples))
    marker.write_text(json.dumps(want))
    return want | counts | {"seconds": round(time.perf_counter() - t0, 1)}


def _stage_process(stage: str, work: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--dir", str(work),
           "--n-jobs", str(args.n_jobs), "--chunk-size", str(args.chunk_size), "--steps", str(args.steps),
           "--params", args.params]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise SystemExit(f"scale: stage {stage} failed (exit {proc.returncode}) on {work}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(lines: list[dict]) -> None:
    """Largest / smallest N: per-image time and parent peak RSS per stage, to stderr."""
    if len(lines) < 2:
        return
    lo, hi = lines[0], lines[-1]
    print(f"scale: N {lo['n']} -> {hi['n']} ({hi['n'] / lo['n']:g}x)", file=sys.stderr)
    for st in STAGES:
        a, b = lo["stages"][st], hi["stages"][st]
        print(f"  {st:7s} ms/image {a['ms_per_image']:.3f} -> {b['ms_per_image']:.3f} "
              f"({b['ms_per_image'] / a['ms_per_image']:.2f}x), cpu ms/image {a['cpu_ms_per_image']:.3f} -> "
              f"{b['cpu_ms_per_image']:.3f} ({b['cpu_ms_per_image'] / a['cpu_ms_per_image']:.2f}x), parent peak RSS "
              f"{a['parent_peak_rss_mib']:.0f} -> {b['parent_peak_rss_mib']:.0f} MiB "
              f"({b['parent_peak_rss_mib'] / a['parent_peak_rss_mib']:.2f}x)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 40_000, 160_000])
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--aligned", type=Path, default=Path("data/lfw/aligned"),
                    help="align-stage output whose train crops seed the simulation")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/out/scale"))
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=1000, help="ingest.chunk_size")
    ap.add_argument("--steps", type=int, default=20, help="training steps timed (after one warm-up step)")
    ap.add_argument("--params", default="params.yaml", help="train section for the training steps")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--keep", action="store_true", help="keep each N's stage outputs")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: one stage, this process
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        emit(run_stage(args.stage, args.dir, args.n_jobs, args.chunk_size, args.steps, args.params))
        return 0
    lines = []
    for n in args.n:
        work = args.work / str(n)
        work.mkdir(parents=True, exist_ok=True)
        source = make_source(args.aligned, work / "rec", n, args.images_per_identity, args.seed)
        figures = {"n": n, "n_jobs": args.n_jobs, "chunk_size": args.chunk_size, "cpus": os.cpu_count(),
                   "source": {k: source[k] for k in ("images", "classes", "seconds", "reused") if k in source},
                   "stages": {}}
        for stage in args.stages:
            figures["stages"][stage] = _stage_process(stage, work, args)
        emit(figures)
        lines.append(figures)
        if not args.keep:
            for name in ("ingest", "masked", "aligned", "shards"):
                shutil.rmtree(work / name, ignore_errors=True)
    if set(args.stages) == set(STAGES):
        _ratios(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
