"""Shared fixtures: small real LFW subsets copied into temporary folders (the data is read-only)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def lfw_root() -> Path:
    root = Path(os.environ.get("LFW_SOURCE") or PROJECT_ROOT.parent / "shared" / "data" / "lfw")
    if not (root / "lfw-deepfunneled").is_dir():
        pytest.fail(f"LFW not found at {root}: set LFW_SOURCE to a folder with lfw-deepfunneled/")
    return root


def _people(path: Path) -> list[tuple[str, int]]:
    lines = [ln.split() for ln in path.read_text().splitlines()[1:] if ln.strip()]
    return [(p[0], int(p[1])) for p in lines if len(p) == 2]


def make_lfw_subset(dest: Path, n_train: int, n_test: int, min_images: int = 2) -> Path:
    """An LFW-shaped folder with the first identities (having >= min_images) of each View 1 split,
    their images copied, and protocol files filtered to those people."""
    src = lfw_root()
    dest.mkdir(parents=True, exist_ok=True)
    chosen: set[str] = set()
    for name, n in (("peopleDevTrain.txt", n_train), ("peopleDevTest.txt", n_test)):
        people = [(p, c) for p, c in _people(src / name) if c >= min_images][:n]
        chosen.update(p for p, _ in people)
        (dest / name).write_text(f"{len(people)}\n" + "".join(f"{p}\t{c}\n" for p, c in people))
        for p, _ in people:
            shutil.copytree(src / "lfw-deepfunneled" / p, dest / "lfw-deepfunneled" / p)
    for name in ("pairsDevTrain.txt", "pairsDevTest.txt", "pairs.txt"):
        kept = []
        for line in (src / name).read_text().splitlines()[1:]:
            f = line.split()
            names = [f[0]] if len(f) == 3 else [f[0], f[2]] if len(f) == 4 else []
            if names and all(n in chosen for n in names):
                kept.append(line)
        (dest / name).write_text(f"{len(kept)}\n" + "".join(k + "\n" for k in kept))
    return dest


@pytest.fixture(scope="session")
def lfw_small(tmp_path_factory) -> Path:
    """6 train + 4 test identities with >= 2 images each (about 60 real LFW images)."""
    return make_lfw_subset(tmp_path_factory.mktemp("lfw_small"), 6, 4)
