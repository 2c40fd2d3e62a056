"""The exported embedder against the checkpoint, on the same real aligned crops, in one run:
onnxruntime vs torch crops/s with one thread and with every core, and their cosine.

Crops: both twins of the validation shards' first pairs (data/shards, real aligned LFW crops).
Needs `dvc repro export` (models/model.pt and models/model.onnx). Prints one JSON line.

    python benchmarks/export.py [--crops 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import PeakRSS, emit, timed  # noqa: E402
from pipeline.recognition.embedders import OnnxEmbedder, TorchEmbedder  # noqa: E402
from pipeline.recognition.export import validation_crops  # noqa: E402


def best_rate(embedder, crops, repeats: int) -> float:
    embedder.embed(crops[:64], batch_size=64)  # warm-up: first-call allocations
    return max(len(crops) / timed(embedder.embed, crops, batch_size=64)[1] for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--onnx", default="models/model.onnx")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--crops", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    crops = validation_crops(args.shards, args.crops)
    cores = len(os.sched_getaffinity(0))
    out = {"crops": len(crops), "crop_size": int(crops.shape[1]), "cores": cores}
    with PeakRSS() as rss:
        for threads in (1, cores):
            torch.set_num_threads(threads)
            pt, ort = TorchEmbedder(args.model), OnnxEmbedder(args.onnx, threads=threads)
            a, b = pt.embed(crops), ort.embed(crops)
            out[f"torch_crops_per_s_{threads}t"] = round(best_rate(pt, crops, args.repeats), 1)
            out[f"onnx_crops_per_s_{threads}t"] = round(best_rate(ort, crops, args.repeats), 1)
            out[f"onnx_over_torch_{threads}t"] = round(out[f"onnx_crops_per_s_{threads}t"]
                                                        / out[f"torch_crops_per_s_{threads}t"], 3)
        out["min_cosine"] = round(float((a * b).sum(axis=1).min()), 7)
    out["peak_rss_mib"] = rss.peak_mib
    emit(out)


if __name__ == "__main__":
    main()
