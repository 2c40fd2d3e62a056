"""The trained embedder as an ONNX file, to run outside this venv (onnxruntime on a door, a phone,
a photo library), with its preprocessing written into the file.

:func:`export_onnx` traces ``models/model.pt``'s embedding network (torch.onnx, opset
``ONNX_OPSET``, the batch axis dynamic) and stores, as ONNX metadata (``metadata_props``), all a
user needs to feed it (``pipeline.recognition.embedders.ONNX_METADATA_KEYS``):

- ``template`` / ``crop_size``: the crop layout (pipeline.align.geometry; five points given in
  ``template_points``, pixels of the crop), so any aligner can make the crop;
- ``input``: ``NCHW float32, RGB, x / 127.5 - 1`` (``mean`` / ``std`` in 0-255 units:
  127.5 each, :func:`pipeline.recognition.models.pixels_to_input`); ``flip``: whether evaluation averaged the mirrored crop (evaluate.flip);
- ``embedding_dim`` and ``output``: raw embeddings, to L2-normalise and compare by cosine;
- ``source_sha256``: the sha256 of the checkpoint it was exported from; decision thresholds
  calibrated for that checkpoint (validation/thresholds.json) hold for the ONNX file because
  the export is checked against it (below), so `identify` looks them up by this sha256.

With ``check_crops`` (real aligned crops: the export stage passes validation crops), both the
torch model and the ONNX graph embed them and the export is refused unless every crop's cosine
between the two is at least ``min_cosine``. :class:`pipeline.recognition.embedders.OnnxEmbedder` runs the
file and checks its metadata.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from pipeline.config import ExportParams
from pipeline.recognition.embedders import ONNX_INPUT, ONNX_METADATA_KEYS, OnnxEmbedder, TorchEmbedder

ONNX_OPSET = 17
OUTPUT = "embedding"
MIN_COSINE = 0.9999


class ExportError(RuntimeError):
    pass


def _onnx_bytes(net, size: int) -> bytes:
    import torch

    buf = io.BytesIO()
    # the trace records the branches on crop and feature-map sizes, which are fixed for a template
    # (only the batch axis varies): their TracerWarnings say nothing about this network
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(net, (torch.zeros(2, 3, size, size),), buf, opset_version=ONNX_OPSET,
                          input_names=[ONNX_INPUT], output_names=[OUTPUT],
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=False)
    return buf.getvalue()


def with_metadata(model_bytes: bytes, metadata: dict[str, str]) -> bytes:
    """The ONNX bytes with ``metadata`` as its metadata_props (sorted keys: the same bytes each run)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    del model.metadata_props[:]
    for key in sorted(metadata):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(metadata[key])
    # the file names the module by its path when the exported models were made (pipeline/export.py, now
    # pipeline/recognition/export.py): kept, so moving the code changes no byte of model.onnx
    model.doc_string = "face embedder; preprocessing in metadata_props (pipeline/export.py)"
    return model.SerializeToString()


def export_onnx(*, model_path: str | Path, out_path: str | Path, flip: bool = False,
                check_crops: np.ndarray | None = None, min_cosine: float = MIN_COSINE) -> dict:
    """models/model.pt -> an ONNX file at ``out_path``; returns what was written and checked."""
    import torch

    from pipeline.align.geometry import get_template
    from pipeline.recognition.models import load_embedding_model
    from pipeline.data.tar_chunks import file_sha256

    model_path, out_path = Path(model_path), Path(out_path)
    net = load_embedding_model(model_path)
    template = get_template(net.config.get("template", "arcface112"))
    with torch.no_grad():
        dim = int(net(torch.zeros(1, 3, template.size, template.size)).shape[1])
    metadata = {  # every key of ONNX_METADATA_KEYS
        "template": template.name, "crop_size": template.size,
        "template_points": ";".join(f"{x:.4f},{y:.4f}" for x, y in template.points),
        "input": "NCHW float32, RGB, x / 127.5 - 1 for uint8 x", "mean": "127.5,127.5,127.5",
        "std": "127.5,127.5,127.5", "channel_order": "RGB", "flip": str(bool(flip)).lower(),
        "embedding_dim": dim, "output": "B x embedding_dim, not normalised: L2-normalise, compare by cosine",
        # "pipeline.export": the module's name when the exported models were made (see with_metadata)
        "source_sha256": file_sha256(model_path), "producer": f"pipeline.export, opset {ONNX_OPSET}",
    }
    assert sorted(metadata) == sorted(ONNX_METADATA_KEYS)  # what OnnxEmbedder checks for
    data = with_metadata(_onnx_bytes(net, template.size), metadata)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(data)
    report = {"onnx": out_path.name, "opset": ONNX_OPSET, "bytes": len(data), "metadata": metadata}
    if check_crops is not None and len(check_crops):
        a = TorchEmbedder(model_path).embed(check_crops)
        b = OnnxEmbedder(tmp).embed(check_crops)
        cos = (a * b).sum(axis=1)
        report["check"] = {"crops": len(check_crops), "min_cosine": round(float(cos.min()), 7),
                           "mean_cosine": round(float(cos.mean()), 7), "required": min_cosine}
        if cos.min() < min_cosine:
            tmp.unlink()
            raise ExportError(f"{out_path}: the ONNX graph's embeddings differ from {model_path}'s: cosine "
                              f"{cos.min():.6f} < {min_cosine} on {int((cos < min_cosine).sum())} of "
                              f"{len(cos)} crops")
    tmp.replace(out_path)
    return report


def validation_crops(shards_dir: str | Path, n: int) -> np.ndarray | None:
    """Up to ``n`` real aligned crops, both twins of the val shards' first pairs in shard order
    (held-out train people: never a test person); None when n is 0 or there are none."""
    from pipeline.data.images import decode_rgb
    from pipeline.pack.shards import read_shard_set
    from pipeline.data.tar_chunks import read_chunk

    if n <= 0:
        return None
    crops: list[np.ndarray] = []
    for shard in read_shard_set(shards_dir).val:
        for _, members in read_chunk(shard):
            crops += [decode_rgb(members[m]) for m in ("raw.jpg", "masked.jpg")]
            if len(crops) >= n:
                return np.stack(crops[:n])
    return np.stack(crops) if crops else None


def run_export(*, params: ExportParams, flip: bool, model_path: str | Path, shards_dir: str | Path,
               out_path: str | Path, report_path: str | Path) -> dict:
    """The export stage: the ONNX file, checked on ``params.check_crops`` validation crops, and its
    report (eval/export.json)."""
    from pipeline.data.tar_chunks import write_json

    report = export_onnx(model_path=model_path, out_path=out_path, flip=flip,
                         check_crops=validation_crops(shards_dir, params.check_crops))
    write_json(report_path, report)
    return report
