"""The one seeded RNG: every random choice is a function of (seed, item names), never of order,
chunking, worker count or process (Python's hash() is salted per process, sha256 is not)."""
from __future__ import annotations

import hashlib

import numpy as np


def seed_for(*parts: object) -> int:
    """A 64-bit seed from ``parts`` joined by ':' (e.g. ``seed_for(seed, epoch, key)``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def item_rng(*parts: object) -> np.random.Generator:
    """A numpy Generator seeded by :func:`seed_for`."""
    return np.random.default_rng(seed_for(*parts))


def rank_key(*parts: object) -> bytes:
    """A stable, well-spread sort key (contact-sheet picks: the smallest hashes of the ids)."""
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
