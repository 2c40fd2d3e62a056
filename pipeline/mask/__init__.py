"""Mask: synthetic masks put on faces, the bank of real masks, and what the mask stage recorded.

What lives here: mask templates and the landmarks they are anchored on
(:mod:`~pipeline.mask.templates`, :mod:`~pipeline.mask.landmarks`), the overlay
(:mod:`~pipeline.mask.overlay`), the real-mask bank and its stage (:mod:`~pipeline.mask.bank`,
:mod:`~pipeline.mask.bank_stage`), the mask stage (:mod:`~pipeline.mask.stage`), the one reader of
its per-image records for the stages after it (:mod:`~pipeline.mask.records`: pack, evaluate,
validate), and how real the synthetic masks look (:mod:`~pipeline.mask.realism`).

Depends on: :mod:`pipeline.align` (face and landmark detection, crop geometry),
:mod:`pipeline.data`, and the top-level helpers (config, dlib_models, parallel, seeding,
stage_report, and metrics/bootstrap for realism's figure).
"""
