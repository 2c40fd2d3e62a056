"""Evaluate: embeddings scored on leak-free protocols, and the thresholds set from them.

What lives here: the evaluate and embed_reference stages' logic (:mod:`~pipeline.evaluate.evaluation`:
embed aligned crops, score verification, identification and open-set search with identity-level
bootstrap intervals), validation on the held-out train people (:mod:`~pipeline.evaluate.validation`,
the same code, and :class:`~pipeline.evaluate.validation.Validator`, the train loop's view of it),
the 1:N decision thresholds (:mod:`~pipeline.evaluate.thresholds`), face overlap between training
sets and LFW (:mod:`~pipeline.evaluate.overlap`) and external pair benchmarks
(:mod:`~pipeline.evaluate.pair_benchmark`).

Depends on: :mod:`pipeline.recognition` (the embedders), :mod:`pipeline.pack` (val shards),
:mod:`pipeline.mask` (mask records: figures per type and coverage), :mod:`pipeline.align`,
:mod:`pipeline.data` (protocols, tar chunks), and the top-level helpers (metrics, bootstrap,
config, devices, seeding). The calibrate command stays at the top: it embeds like
``pipeline.embed`` does.
"""
