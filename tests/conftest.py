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


@pytest.fixture(scope="session")
def tiny_shards(lfw_small, tmp_path_factory) -> Path:
    """Real train/test shards of lfw_small through the real pipeline (ingest -> mask -> align ->
    pack), cut into shards of 4 pairs so DDP ranks and loader workers each get some."""
    from pipeline.aligning import run_align
    from pipeline.config import AlignParams, ComputeParams, IngestParams, MaskParams, PackParams
    from pipeline.ingest import run_ingest
    from pipeline.masking import run_mask
    from pipeline.pack import run_pack

    root = tmp_path_factory.mktemp("tiny_pipeline")
    compute = ComputeParams(n_jobs=1)
    run_ingest(params=IngestParams(path=str(lfw_small)), compute=compute, out_dir=root / "ingest")
    run_mask(params=MaskParams(), compute=compute, in_dir=root / "ingest", out_dir=root / "masked")
    run_align(params=AlignParams(), compute=compute, ingest_dir=root / "ingest",
              masked_dir=root / "masked", out_dir=root / "aligned")
    run_pack(params=PackParams(shard_max_count=4), aligned_dir=root / "aligned", out_dir=root / "shards")
    return root / "shards"


def write_view1_pairs(lfw_dir: Path, people_file: str = "peopleDevTest.txt",
                      out_file: str = "pairsDevTest.txt") -> int:
    """Rewrite a subset's pairs file in LFW's View 1 format ('N', N same lines, N different lines)
    from the subset's own people, so a tiny evaluation has both kinds of pair (make_lfw_subset keeps
    only the official lines whose people it copied: on a few people that leaves no different pairs).
    Returns N."""
    people = [p for p, _ in _people(lfw_dir / people_file)]
    images = {p: sorted(int(f.stem.rsplit("_", 1)[1]) for f in (lfw_dir / "lfw-deepfunneled" / p).glob("*.jpg"))
              for p in people}
    per_person = [[f"{p}\t{a}\t{b}" for i, a in enumerate(images[p]) for b in images[p][i + 1:]]
                  for p in people]
    same = [lines[k] for k in range(max(map(len, per_person))) for lines in per_person if k < len(lines)]
    diff = [f"{p}\t{images[p][k % len(images[p])]}\t{q}\t{images[q][k % len(images[q])]}"
            for k in range(3) for i, p in enumerate(people) for q in people[i + 1:]]
    n = min(len(same), len(diff))
    (lfw_dir / out_file).write_text(f"{n}\n" + "".join(x + "\n" for x in same[:n] + diff[:n]))
    return n


@pytest.fixture(scope="session")
def lfw_eval_small(tmp_path_factory) -> Path:
    """3 train + 4 test identities with >= 2 images (8 + 27 real LFW images), View 1 test pairs
    rebuilt among the test people (both kinds), View 2 pairs.txt among all of them."""
    root = make_lfw_subset(tmp_path_factory.mktemp("lfw_eval_small"), 3, 4)
    write_view1_pairs(root)
    (root / "people_all.txt").write_text(
        "".join(ln + "\n" for f in ("peopleDevTrain.txt", "peopleDevTest.txt")
                for ln in (root / f).read_text().splitlines()[1:]))
    n = write_view1_pairs(root, "people_all.txt", "pairs.txt")
    text = (root / "pairs.txt").read_text().split("\n", 1)[1]
    (root / "pairs.txt").write_text(f"1\t{n}\n{text}")
    (root / "people_all.txt").unlink()
    return root
