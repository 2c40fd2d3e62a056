"""Evaluation throughput: embedding (trained-model architecture, dlib reference) and scoring.

Prints one JSON line: crops/s of a ResNet18 embedding model and of dlib's ResNet on real aligned
LFW crops, the latter both through its torch port (what embed_reference runs) and through dlib
itself (``dlib_port_speedup`` = their ratio, same crops, same run), 10-fold verification on View
2's size (6,000 pairs) and gallery identification on View 1 test's size (496 identities, 1,997
probes), plus peak RSS.

    python benchmarks/evaluate.py [--crops 64] [--model models/model.pt]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.align.detection import align_standalone  # noqa: E402
from pipeline.align.geometry import ARCFACE_112, DLIB_150, Template  # noqa: E402
from pipeline.recognition.embedders import DlibEmbedder, DlibLibraryEmbedder, TorchEmbedder  # noqa: E402
from pipeline.metrics import cmc, identification_ranks, l2_normalize, verification_metrics  # noqa: E402
from pipeline.recognition.models import EmbeddingNet  # noqa: E402

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw" / "lfw-deepfunneled"


def real_crops(n: int, template: Template) -> np.ndarray:
    crops = []
    for f in sorted(LFW.glob("*/*_0001.jpg")):
        c = align_standalone(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), template=template).crop
        if c is not None:
            crops.append(c)
        if len(crops) == n:
            break
    return np.stack(crops)


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crops", type=int, default=128)
    ap.add_argument("--model", help="a trained checkpoint; default: an untrained ResNet18 (same cost)")
    args = ap.parse_args()
    crops = real_crops(args.crops, ARCFACE_112)
    chips = real_crops(args.crops, DLIB_150)  # the default template: dlib's own chip
    model = args.model
    if model is None:
        model = Path("benchmarks/out/bench_model.pt")
        model.parent.mkdir(parents=True, exist_ok=True)
        net = EmbeddingNet("resnet18", 512).eval()
        torch.save({"model": net.state_dict(), "config": net.config, "meta": {}}, model)
    emb = TorchEmbedder(model)
    emb.embed(crops[:8])  # warm-up
    out = {"crops": len(crops), "torch_threads": torch.get_num_threads(),
           "model_crops_per_s": rate(lambda: emb.embed(crops, batch_size=64), len(crops)),
           "model_flip_crops_per_s": rate(lambda: emb.embed(crops, flip=True, batch_size=64), len(crops))}
    port, library = DlibEmbedder(), DlibLibraryEmbedder()
    port.embed(chips[:8]), library.embed(chips[:2])  # warm-up
    out["dlib_port_crops_per_s"] = rate(lambda: port.embed(chips, batch_size=128), len(chips))
    out["dlib_library_crops_per_s"] = rate(lambda: library.embed(chips), len(chips))
    out["dlib_port_speedup"] = out["dlib_port_crops_per_s"] / out["dlib_library_crops_per_s"]
    port112 = DlibEmbedder(template="arcface112")  # 112 crops, resampled to the chip inside
    port112.embed(crops[:8])
    out["dlib_port_arcface112_crops_per_s"] = rate(lambda: port112.embed(crops, batch_size=128), len(crops))

    rng = np.random.default_rng(0)
    n = 6000
    labels = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    scores = rng.normal(labels * 1.0, 1.0)
    folds = np.arange(n) % 10
    out["verification_pairs_per_s"] = rate(lambda: verification_metrics(scores, labels, folds), n)
    ids = np.arange(496)
    gallery = l2_normalize(rng.normal(size=(496, 512)))
    probe_ids = rng.integers(0, 496, 1997)
    probes = l2_normalize(gallery[probe_ids] + rng.normal(scale=0.05, size=(1997, 512)))
    out["identification_probes_per_s"] = rate(
        lambda: cmc(identification_ranks(gallery, ids, probes, probe_ids), 20), len(probes))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
