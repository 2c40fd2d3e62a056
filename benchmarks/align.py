"""Benchmark the align stage (images/s on N ingested+masked LFW images). Prints ONE JSON line.
Standalone alignment (photos without a twin) has its own: benchmarks/standalone.py.

Usage (from the project root, after the mask stage):
  python benchmarks/align.py [--n 500]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mask import make_input  # noqa: E402
from benchmarks.measure import PeakRSS, emit, timed  # noqa: E402
from pipeline.align.stage import run_align  # noqa: E402
from pipeline.config import AlignParams, ComputeParams  # noqa: E402
from pipeline.data.tar_chunks import list_chunks, read_chunk, record_chunks, write_chunk  # noqa: E402


def make_twins(masked: Path, bench_in: Path, dest: Path) -> None:
    """The mask stage's twins of the benchmark's images, chunked like them."""
    twins = {}
    for chunk in list_chunks(masked / "chunks"):
        twins.update(read_chunk(chunk))
    for chunk in list_chunks(bench_in / "chunks"):
        keys = [k for k, _ in read_chunk(chunk)]
        write_chunk(dest / "chunks" / chunk.name, [(k, twins[k]) for k in keys if k in twins])
    record_chunks(dest / "chunks")
    shutil.copy(masked / "status.parquet", dest / "status.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ingest", default="data/lfw/ingest")
    ap.add_argument("--masked", default="data/lfw/masked")
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    figures: dict = {"stage": "align"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        figures["images"] = n = make_input(Path(args.ingest), tmp / "in", args.n, n_chunks=2)
        make_twins(Path(args.masked), tmp / "in", tmp / "masked")
        for name, n_jobs in (("n_jobs_1", 1), ("n_jobs_2", 2)):
            cpu0 = time.thread_time()
            with PeakRSS() as rss:
                summary, seconds = timed(run_align, params=AlignParams(), compute=ComputeParams(n_jobs=n_jobs),
                                         ingest_dir=tmp / "in", masked_dir=tmp / "masked",
                                         out_dir=tmp / f"out{n_jobs}")
            figures[f"images_per_s_{name}"] = round(n / seconds, 1)
            if n_jobs == 1:  # in-process: the per-core rate, meaningful on a busy machine
                figures["images_per_cpu_s_n_jobs_1"] = round(n / (time.thread_time() - cpu0), 1)
            figures[f"peak_rss_mib_{name}"] = rss.peak_mib
    figures.update(aligned=summary["aligned"], routes=summary["routes"],
                   eye_within_4px=summary["eye_error_px"]["within_4px_share"])
    emit(figures)


if __name__ == "__main__":
    main()
