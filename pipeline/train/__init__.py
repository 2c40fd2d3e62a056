"""Train: the training stage, from shards to ``models/model.pt``; the top of the package order.

What lives here: the loop (:mod:`~pipeline.train.loop`: ranks, setup, :func:`~pipeline.train.loop.train`
and one epoch, read top to bottom), the pair model and one optimiser step
(:mod:`~pipeline.train.pair_model`), the ArcFace head and distillation losses
(:mod:`~pipeline.train.losses`), the loader of (raw, masked) twins from the shards
(:mod:`~pipeline.train.pair_loader`), and the checkpoint and resume state with its fingerprint
(:mod:`~pipeline.train.checkpoint`).

Why it is apart from recognition: the loop picks its checkpoint by validation, which embeds and
scores through :mod:`pipeline.evaluate`, which embeds through :mod:`pipeline.recognition`; in one
package with the networks that would be a cycle.

Depends on: :mod:`pipeline.evaluate` (validation), :mod:`pipeline.recognition` (networks, input
scaling), :mod:`pipeline.pack` (shards), :mod:`pipeline.align`, :mod:`pipeline.data`, and the
top-level helpers (config, devices, seeding).
"""
