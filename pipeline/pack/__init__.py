"""Pack: aligned pairs -> WebDataset training shards, and the one reader of those shards.

What lives here: the pack stage (:mod:`~pipeline.pack.stage`: the train/val identity split, the
shuffled train and val shards, ``classes.json`` and ``index.json``) and
:mod:`~pipeline.pack.shards`, the one reader of a shards folder, kept apart from the packing code
so that train, validate, evaluate and export depend on the format, not on how pack computes it.

Depends on: :mod:`pipeline.mask` (which mask types the mask stage recorded: unseen types stay out
of training), :mod:`pipeline.align` (crop templates), :mod:`pipeline.data` (tar chunks), and the
top-level helpers (config, parallel, seeding).
"""
