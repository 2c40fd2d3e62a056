"""Mask-aware face recognition pipeline: the library behind the DVC stages in stages/.

Packages by concept, one level deep, in the order they may import one another (a package imports
only the packages before it, plus the helpers at the top; tests/test_layout.py checks it):

- :mod:`pipeline.data`: inputs and the formats every stage shares (ingest, LFW, RecordIO, tar
  chunks, image decoding, the evaluation protocols' identity splits);
- :mod:`pipeline.align`: face detection and the crop geometry, and the align stage;
- :mod:`pipeline.mask`: synthetic masks (templates, landmarks, overlay, the real-mask bank), the
  mask stage and the reader of what it recorded;
- :mod:`pipeline.pack`: the pack stage and the one reader of its training shards;
- :mod:`pipeline.recognition`: the embedding networks (torchvision ResNets, dlib's ResNet ported
  to torch), the embedders every evaluation goes through, the ONNX export;
- :mod:`pipeline.evaluate`: scoring embeddings on leak-free protocols (the evaluate, embed_reference,
  validate, overlap and pair_benchmark stages), the 1:N thresholds;
- :mod:`pipeline.train`: the training loop, its pair model, losses, loader and resume state.

At the top: small helpers every package may use and which import no package (config, parallel,
seeding, devices, stage_report, dlib_models, and the statistics in metrics and bootstrap), and the
user commands ``python -m pipeline.embed`` / ``identify`` / ``calibrate``, which may import any
package and which no package imports.
"""
