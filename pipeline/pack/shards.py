"""What the pack stage writes, as the stages after it read it: the one reader of a shards folder
(``classes.json``, ``index.json``, ``train-*.tar``, ``val-*.tar``; :mod:`pipeline.pack.stage` writes
them). Kept apart from the packing code so that train, validate and evaluate depend on the format,
not on how pack computes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipeline.align.geometry import LEGACY_TEMPLATE
from pipeline.data.tar_chunks import file_sha256, list_chunks

CLASSES_FILE, INDEX_FILE = "classes.json", "index.json"
TRAIN_PREFIX, VAL_PREFIX = "train-", "val-"


@dataclass(frozen=True)
class ShardSet:
    """What pack wrote, as the train, validate and evaluate stages read it: the training classes,
    what index.json says about the shards, and the shards themselves (listed and checked against
    their record only when asked for: evaluation needs the identities, not the tars)."""

    folder: Path
    classes: dict[str, int]
    train_samples: int
    val_identities: list[str]
    fingerprint: str  # sha256 of index.json, which holds every shard's sha256
    template: str  # the crop layout the pairs were aligned to (align.template)
    standalone_twins: int = 0  # train pairs whose masked twin was also aligned on its own
    held_out_mask_types: tuple[str, ...] = ()  # pack.unseen_mask_types: types kept out of training

    @cached_property
    def train(self) -> list[Path]:
        return list_chunks(self.folder, TRAIN_PREFIX)

    @cached_property
    def val(self) -> list[Path]:
        return list_chunks(self.folder, VAL_PREFIX)

    @property
    def trained_identities(self) -> set[str]:
        """Identities the model was trained or selected on: the classes and the validation people."""
        return set(self.classes) | set(self.val_identities)


def read_shard_set(shards_dir: str | Path) -> ShardSet:
    """The one reader of pack's output: classes.json and index.json are required; the shard lists
    (``train``, ``val``) are what the folder holds, possibly none: the caller says what it needs."""
    shards_dir = Path(shards_dir)
    classes_file, index_file = shards_dir / CLASSES_FILE, shards_dir / INDEX_FILE
    missing = [f.name for f in (classes_file, index_file) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{shards_dir}: no {' or '.join(missing)} (run the pack stage)")
    classes, index = json.loads(classes_file.read_text()), json.loads(index_file.read_text())
    if not isinstance(classes, dict) or not all(isinstance(v, int) for v in classes.values()):
        raise ValueError(f"{classes_file}: expected {{identity: label}}, as pack writes it")
    return ShardSet(shards_dir, classes, int(index["train"]["samples"]),
                    list(index.get("val", {}).get("identities", [])), file_sha256(index_file),
                    index.get("template", LEGACY_TEMPLATE), int(index["train"].get("standalone_twins", 0)),
                    tuple(index.get("params", {}).get("unseen_mask_types", [])))
