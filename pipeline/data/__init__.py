"""Data: the inputs and the on-disk formats every later stage reads; the bottom of the pipeline.

What lives here: the ingest stage (:mod:`~pipeline.data.ingest`: a data set -> vetted raw tar
chunks + manifest) and its sources (LFW via :mod:`~pipeline.data.lfw_source`, insightface RecordIO
via :mod:`~pipeline.data.recordio`); the formats that every stage writes and reads
(:mod:`~pipeline.data.tar_chunks`, deterministic WebDataset tars; :mod:`~pipeline.data.image_check`,
the vetting of one input file; :mod:`~pipeline.data.images`, the one decoder/encoder and a masked
twin's overlay patch); and :mod:`~pipeline.data.protocols`, which identities and images form each
split, pair list and gallery (LFW's people and pairs files, the seeded leak-free splits).

Why protocols is here, not in evaluate: ingest splits LFW by its people files, and evaluate and
validate build their pairs and galleries from the same module; scoring them is evaluate's part.

Depends on: the top-level helpers (config, parallel, seeding) only; no other package.
"""
