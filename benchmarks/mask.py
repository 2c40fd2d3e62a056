"""Benchmark the mask stage: images/s at n_jobs=1 and 2 on N ingested LFW images; prints ONE JSON line.

Usage (from the project root, after the ingest stage): python benchmarks/mask.py [--n 1000]
The N images are the first N of data/lfw/ingest's chunks, re-chunked into 4 chunks so 2 workers share
the work. n_jobs=1 runs in this process, so it is timed twice: cold (predictor load, template
drawing) and warm (steady state, the per-core figure).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import PeakRSS, emit, timed  # noqa: E402
from pipeline.config import ComputeParams, MaskParams  # noqa: E402
from pipeline.mask.stage import run_mask  # noqa: E402
from pipeline.tar_chunks import list_chunks, read_chunk, record_chunks, write_chunk  # noqa: E402


def make_input(src: Path, dest: Path, n: int, n_chunks: int = 4) -> int:
    samples = []
    for chunk in list_chunks(src / "chunks"):
        for key, members in read_chunk(chunk):
            samples.append((key, members))
            if len(samples) == n:
                break
        if len(samples) == n:
            break
    per = -(-len(samples) // n_chunks)
    for i in range(n_chunks):
        if samples[i * per:(i + 1) * per]:
            write_chunk(dest / "chunks" / f"bench-{i:06d}.tar", samples[i * per:(i + 1) * per])
    record_chunks(dest / "chunks")  # as a stage does: the next one reads only recorded chunks
    return len(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ingest", default="data/lfw/ingest")
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    params = MaskParams()
    figures: dict = {"stage": "mask"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        figures["images"] = n = make_input(Path(args.ingest), tmp / "in", args.n)
        runs = (("n_jobs_1_cold", 1), ("n_jobs_1_warm", 1), ("n_jobs_2", 2))
        for name, n_jobs in runs:
            cpu0 = time.thread_time()  # this thread only: not the RSS sampler
            with PeakRSS() as rss:
                summary, seconds = timed(run_mask, params=params, compute=ComputeParams(n_jobs=n_jobs),
                                         in_dir=tmp / "in", out_dir=tmp / f"out{n_jobs}")
            figures[f"images_per_s_{name}"] = round(n / seconds, 1)
            if n_jobs == 1:  # in-process: images per CPU-second, the per-core rate on a busy machine
                figures[f"images_per_cpu_s_{name}"] = round(n / (time.thread_time() - cpu0), 1)
            figures[f"peak_rss_mib_{name}"] = rss.peak_mib
    figures.update(masked=summary["masked"], rejected=summary["rejected"], routes=summary["routes"],
                   landmark_route_share=summary["landmark_route_share"])
    emit(figures)


if __name__ == "__main__":
    main()
