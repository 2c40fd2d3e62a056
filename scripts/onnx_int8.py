"""An int8 version of the exported model (onnxruntime static quantisation), to be kept only if its
validation figures stay within the interval of the fp32 export's (issue 25).

Static QDQ quantisation, per-channel int8 weights and uint8 activations, calibrated on real
validation crops (both twins of the val shards' first pairs: held-out TRAIN people, never a test
person); the fp32 file's metadata is carried over. Then both are scored on the validation pairs
beside each other, with their intervals and the paired difference:

    python scripts/onnx_int8.py [--onnx models/model.onnx] [--out build/model.int8.onnx] [--crops 512]
    python scripts/validate_models.py models/model.onnx build/model.int8.onnx --markdown
    python benchmarks/export.py --onnx build/model.int8.onnx     # its speed against torch
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.recognition.embedders import ONNX_INPUT, OnnxEmbedder  # noqa: E402
from pipeline.recognition.export import validation_crops, with_metadata  # noqa: E402


class Crops:
    """onnxruntime's CalibrationDataReader over the crops, preprocessed as OnnxEmbedder feeds them."""

    def __init__(self, crops: np.ndarray, batch: int = 32):
        x = crops.transpose(0, 3, 1, 2).astype(np.float32)
        self.batches = iter([((x[i:i + batch] / 255.0 - 0.5) / 0.5).astype(np.float32)
                             for i in range(0, len(x), batch)])

    def get_next(self):
        b = next(self.batches, None)
        return None if b is None else {ONNX_INPUT: b}


def main() -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", default="models/model.onnx")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--crops", type=int, default=512)
    ap.add_argument("--out", default="build/model.int8.onnx")
    args = ap.parse_args()
    fp32 = OnnxEmbedder(args.onnx)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(args.onnx, str(out), Crops(validation_crops(args.shards, args.crops)),
                    quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax)
    meta = {**fp32.metadata, "producer": fp32.metadata["producer"] + "; int8 static QDQ (scripts/onnx_int8.py)"}
    out.write_bytes(with_metadata(out.read_bytes(), meta))
    print(f"{out}: {out.stat().st_size} bytes (fp32: {Path(args.onnx).stat().st_size})")


if __name__ == "__main__":
    main()
