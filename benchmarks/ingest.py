"""Benchmark the ingest stage on full LFW: images/s at n_jobs=1 and 2, peak RSS. One JSON line.

Usage: python benchmarks/ingest.py [--lfw data/sources/lfw]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import PeakRSS, emit, timed  # noqa: E402
from pipeline.config import ComputeParams, IngestParams  # noqa: E402
from pipeline.data.ingest import run_ingest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lfw", default="data/sources/lfw")
    args = ap.parse_args()
    figures = {"stage": "ingest", "source": "lfw"}
    for n_jobs in (1, 2):
        with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
            summary, seconds = timed(run_ingest, params=IngestParams(path=args.lfw),
                                     compute=ComputeParams(n_jobs=n_jobs), out_dir=Path(tmp) / "ingest")
        figures[f"images_per_s_n_jobs_{n_jobs}"] = round(summary["inputs"] / seconds, 1)
        figures[f"peak_rss_mib_n_jobs_{n_jobs}"] = rss.peak_mib
        figures["images"] = summary["inputs"]
    figures["speedup_2_vs_1"] = round(figures["images_per_s_n_jobs_2"] / figures["images_per_s_n_jobs_1"], 2)
    emit(figures)


if __name__ == "__main__":
    main()
