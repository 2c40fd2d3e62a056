"""The one tar reader (pipeline.data.tar_chunks.iter_tar, strict: checksums, bounds, end blocks) against
Python's tarfile on the same chunks in the same run, and list_chunks' sha256 check of a folder.

Prints one JSON line: members/s and MB/s of each reader, the strict reader's speed as a ratio of
tarfile's, the folder check's MB/s, peak RSS. Needs `dvc repro align@lfw` done (data/lfw/aligned).

    python benchmarks/tar_read.py [--chunks data/lfw/aligned/chunks] [--limit 4]
"""
from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import PeakRSS, emit, timed  # noqa: E402
from pipeline.data.tar_chunks import iter_tar, list_chunks  # noqa: E402


def _strict(chunks: list[Path]) -> int:
    return sum(1 for c in chunks for _ in iter_tar(c))


def _tarfile(chunks: list[Path]) -> int:
    n = 0
    for c in chunks:
        with tarfile.open(c) as tar:
            for member in tar:
                if member.isfile():
                    tar.extractfile(member).read()
                    n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", default="data/lfw/aligned/chunks")
    ap.add_argument("--limit", type=int, default=4, help="chunks read (the first ones)")
    args = ap.parse_args()
    with PeakRSS() as rss:
        everything, check_s = timed(list_chunks, args.chunks)
        chunks = everything[:args.limit]
        mb = sum(c.stat().st_size for c in chunks) / 1e6
        _strict(chunks)  # warm the page cache for both
        n, strict_s = timed(_strict, chunks)
        n_tf, tarfile_s = timed(_tarfile, chunks)
    assert n == n_tf, (n, n_tf)
    emit({"members": n, "mb": round(mb, 1),
          "strict_members_per_s": round(n / strict_s), "strict_mb_per_s": round(mb / strict_s, 1),
          "tarfile_members_per_s": round(n / tarfile_s), "tarfile_mb_per_s": round(mb / tarfile_s, 1),
          "strict_vs_tarfile": round(tarfile_s / strict_s, 2),
          "folder_check_mb_per_s": round(sum(c.stat().st_size for c in everything) / 1e6 / check_s, 1),
          "peak_rss_mib": rss.peak_mib})


if __name__ == "__main__":
    main()
