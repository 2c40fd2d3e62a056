"""Benchmark the mask-bank stage: photos/s at n_jobs=1 and 2 on N real masked photos, and the mask
stage's images/s wearing bank masks against procedural ones on the same LFW images; prints ONE
JSON line.

Usage (from the project root, after `make data` with MASK_BANK_SOURCE, and the ingest stage):
  python benchmarks/mask_bank.py [--photos data/sources/rmfd] [--n 200]
The first N photos (sorted paths) are copied into a temporary folder.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mask import make_input  # noqa: E402
from benchmarks.measure import PeakRSS, emit, timed  # noqa: E402
from pipeline.config import ComputeParams, MaskBankParams, MaskParams  # noqa: E402
from pipeline.mask.bank_stage import list_photos, run_mask_bank  # noqa: E402
from pipeline.mask.stage import run_mask  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--photos", default="data/sources/rmfd")
    ap.add_argument("--ingest", default="data/lfw/ingest")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--lfw-images", type=int, default=400)
    args = ap.parse_args()
    figures: dict = {"stage": "mask_bank"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = list_photos(Path(args.photos))[0][:args.n]
        for rel in photos:
            (tmp / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(args.photos) / rel, tmp / "src" / rel)
        figures["photos"] = len(photos)
        params = MaskBankParams(path=str(tmp / "src"))
        for name, n_jobs in (("n_jobs_1", 1), ("n_jobs_2", 2)):
            with PeakRSS() as rss:
                summary, seconds = timed(run_mask_bank, params=params, compute=ComputeParams(n_jobs=n_jobs),
                                         out_dir=tmp / f"bank{n_jobs}")
            figures[f"photos_per_s_{name}"] = round(len(photos) / seconds, 1)
            figures[f"peak_rss_mib_{name}"] = rss.peak_mib
        figures.update(kept=summary["kept"], rejected=summary["rejected"])
        # the mask stage on the same LFW images, procedural vs bank masks (one process, warm)
        n = make_input(Path(args.ingest), tmp / "in", args.lfw_images)
        serial = ComputeParams(n_jobs=1)
        run_mask(params=MaskParams(), compute=serial, in_dir=tmp / "in", out_dir=tmp / "warm")
        rates = {}
        for kind, weights in (("procedural", MaskParams().type_weights), ("bank", {"real": 1.0})):
            _, seconds = timed(run_mask, params=MaskParams(type_weights=weights), compute=serial,
                               in_dir=tmp / "in", out_dir=tmp / kind, bank_dir=tmp / "bank1")
            rates[kind] = rates[f"mask_images_per_s_{kind}"] = round(n / seconds, 1)
        figures.update({k: v for k, v in rates.items() if k.startswith("mask_")},
                       mask_bank_over_procedural=round(rates["bank"] / rates["procedural"], 3))
    emit(figures)


if __name__ == "__main__":
    main()
