"""Recognition: the face embedding networks and the embedders every figure is computed through.

What lives here: the networks (:mod:`~pipeline.recognition.models`: torchvision ResNets + an
embedding head, and dlib's face ResNet in torch, :mod:`~pipeline.recognition.dlib_resnet`, with
its weights read by :mod:`~pipeline.recognition.dlib_serialization`), the embedders
(:mod:`~pipeline.recognition.embedders`: aligned crops -> L2-normalised embeddings, one interface
for the trained model, its ONNX export and dlib), and the ONNX export stage's code
(:mod:`~pipeline.recognition.export`).

Depends on: :mod:`pipeline.pack` (export checks the ONNX file on val crops),
:mod:`pipeline.align` (crop templates), :mod:`pipeline.data`, and the top-level helpers (config,
dlib_models, metrics). Training is not here: its loop validates through :mod:`pipeline.evaluate`,
which embeds through this package (see :mod:`pipeline.train`).
"""
