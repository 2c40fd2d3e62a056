"""Align: faces found and warped onto the crop template every network reads.

What lives here: the crop geometry (:mod:`~pipeline.align.geometry`: templates, similarity
transforms, which face is the subject), the detectors (:mod:`~pipeline.align.retinaface`;
:mod:`~pipeline.align.detection`: Haar, dlib HOG/CNN, and the standalone alignment of one photo
with no twin, :func:`~pipeline.align.detection.align_file`, that embed, identify, calibrate and the
pair benchmarks share), and the align stage (:mod:`~pipeline.align.stage`: raw + masked twin ->
one pixel-aligned pair of crops).

Depends on: :mod:`pipeline.data` (tar chunks, images, the ingest manifest) and the top-level
helpers (config, dlib_models, parallel, seeding, stage_report). The mask package builds on the
detectors here, so nothing here imports :mod:`pipeline.mask` (the masked twin's overlay patch is
read with :func:`pipeline.data.images.apply_overlay`).
"""
