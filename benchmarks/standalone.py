"""Standalone alignment (`embed` / `identify`): success rate and speed on one core, on the real
masked photos of RMFD and on the LFW View 1 test people, with the standalone routes of params.yaml,
against the pre-RetinaFace chain (Haar + eyes, then dlib HOG) on the same photos in the same run.

Every photo is accounted for: aligned by a detector route, or rejected with a reason (unreadable
files count as rejected). Prints ONE JSON line:
  python benchmarks/standalone.py [--rmfd ../shared/data/rmfd] [--lfw ../shared/data/lfw] [--baseline-n 200]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import PeakRSS, emit  # noqa: E402
from pipeline.align.detection import align_standalone  # noqa: E402
from pipeline.align.geometry import get_template  # noqa: E402
from pipeline.config import StandaloneParams, load_params  # noqa: E402
from pipeline.align.detection import load_rgb  # noqa: E402
from pipeline.data.protocols import read_people  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(paths: list[Path], params: StandaloneParams, template, desc: str) -> dict:
    """Align every photo on one core; route counts, success share, ms per photo (wall and CPU)."""
    from tqdm import tqdm

    routes: Counter = Counter()
    t0, c0 = time.perf_counter(), time.thread_time()
    for p in tqdm(paths, desc=desc, unit="img"):
        image, reason = load_rgb(p)
        routes["unreadable" if image is None else align_standalone(image, params=params, template=template).route] += 1
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    aligned = sum(v for k, v in routes.items() if k not in ("none", "unreadable"))
    assert sum(routes.values()) == len(paths)  # in = aligned + rejected
    return {"photos": len(paths), "aligned": aligned, "rejected": len(paths) - aligned,
            "aligned_share": round(aligned / max(len(paths), 1), 4), "routes": dict(sorted(routes.items())),
            "ms_per_photo": round(1e3 * wall / max(len(paths), 1), 2),
            "cpu_ms_per_photo": round(1e3 * cpu / max(len(paths), 1), 2)}


def lfw_test_photos(lfw: Path) -> list[Path]:
    people = read_people(lfw / "peopleDevTest.txt")
    return sorted(p for name in people for p in (lfw / "lfw-deepfunneled" / name).glob("*.jpg"))


def spread(paths: list[Path], n: int) -> list[Path]:
    """``n`` paths taken at an even stride (all of them when n is 0)."""
    return paths[:: max(1, len(paths) // n)][:n] if n else paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rmfd", default=str(ROOT.parent / "shared" / "data" / "rmfd"))
    ap.add_argument("--lfw", default=str(ROOT.parent / "shared" / "data" / "lfw"))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--baseline-n", type=int, default=200, help="RMFD photos for the old chain (0 = skip)")
    ap.add_argument("--lfw-n", type=int, default=0, help="LFW test photos (0 = all 3,708)")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    import torch

    torch.set_num_threads(1)
    params = load_params(args.params)
    template = get_template(params.align.template)
    rmfd = sorted(p for p in Path(args.rmfd).rglob("*") if p.is_file())
    lfw = spread(lfw_test_photos(Path(args.lfw)), args.lfw_n)
    figures: dict = {"stage": "standalone_align", "routes_tried": params.standalone.routes,
                     "template": template.name, "threads": 1}
    with PeakRSS() as rss:
        figures["rmfd"] = run(rmfd, params.standalone, template, "rmfd")
        figures["lfw_test"] = run(lfw, params.standalone, template, "lfw test")
    figures["peak_rss_mib"] = rss.peak_mib
    if args.baseline_n:
        sample = spread(rmfd, args.baseline_n)
        old = params.standalone.model_copy(update={"routes": ["haar", "dlib_hog"]})
        figures["rmfd_sample_old_chain"] = run(sample, old, template, "rmfd, old chain")
        figures["rmfd_sample_new_chain"] = run(sample, params.standalone, template, "rmfd, new chain")
        figures["rmfd_sample_aligned_ratio_new_vs_old"] = round(
            figures["rmfd_sample_new_chain"]["aligned"] / max(figures["rmfd_sample_old_chain"]["aligned"], 1), 2)
    emit(figures)


if __name__ == "__main__":
    main()
