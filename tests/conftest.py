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


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, by relative path: what byte-identical outputs compare."""
    from pipeline.data.tar_chunks import file_sha256

    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


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


# real masked photos (../shared/data/rmfd, no identities): a portrait in a white N95 with a valve,
# one in a black cloth mask; three people in check-pattern masks; a mirror selfie whose phone hides
# half the mask
RMFD_KEPT = ("0001/0002.jpg", "0001/0009.jpg")
RMFD_CROWD = "0001/0013.jpg"
RMFD_PHONE = "0001/0026.jpg"


def rmfd_root() -> Path:
    root = lfw_root().parent / "rmfd" / "RWMFD_part_1"
    if not root.is_dir():
        pytest.fail(f"real masked photos not found at {root}")
    return root


def make_bank_subset(dest: Path) -> Path:
    """A mask-bank source: the four RMFD photos above, under their batch folder."""
    for rel in (*RMFD_KEPT, RMFD_CROWD, RMFD_PHONE):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rmfd_root() / rel, dest / rel)
    return dest


@pytest.fixture(scope="session")
def lfw_small(tmp_path_factory) -> Path:
    """6 train + 4 test identities with >= 2 images each (about 60 real LFW images)."""
    return make_lfw_subset(tmp_path_factory.mktemp("lfw_small"), 6, 4)


@pytest.fixture(scope="session")
def tiny_shards(lfw_small, tmp_path_factory) -> Path:
    """Real train/test shards of lfw_small through the real pipeline (ingest -> mask -> align ->
    pack), cut into shards of 4 pairs so DDP ranks and loader workers each get some."""
    from pipeline.align.stage import run_align
    from pipeline.config import AlignParams, ComputeParams, DatasetParams, IngestParams, MaskParams, PackParams
    from pipeline.data.ingest import run_ingest
    from pipeline.mask.stage import run_mask
    from pipeline.pack.stage import run_pack

    root = tmp_path_factory.mktemp("tiny_pipeline")
    compute = ComputeParams(n_jobs=1)
    run_ingest(params=IngestParams(), dataset=DatasetParams(path=str(lfw_small)), compute=compute,
               out_dir=root / "ingest")
    run_mask(params=MaskParams(), compute=compute, in_dir=root / "ingest", out_dir=root / "masked")
    run_align(params=AlignParams(), compute=compute, ingest_dir=root / "ingest",
              masked_dir=root / "masked", out_dir=root / "aligned")
    # every mask type trains here: the training tests need the pairs (test_pack checks unseen_mask_types)
    run_pack(params=PackParams(shard_max_count=4, unseen_mask_types=[]), aligned_dir=root / "aligned", out_dir=root / "shards")
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_twin_shards(tiny_shards, tmp_path_factory) -> Path:
    """tiny_shards' pipeline aligned again with align.standalone_twin_splits [train] (the masked
    train twins also aligned on their own by RetinaFace, as `embed` aligns a photo) and packed
    like tiny_shards: <root>/aligned and <root>/shards."""
    from pipeline.align.stage import run_align
    from pipeline.config import AlignParams, ComputeParams, PackParams
    from pipeline.pack.stage import run_pack

    tiny, root = tiny_shards.parent, tmp_path_factory.mktemp("tiny_twins")
    run_align(params=AlignParams(standalone_twin_splits=["train"]), compute=ComputeParams(n_jobs=1),
              ingest_dir=tiny / "ingest", masked_dir=tiny / "masked", out_dir=root / "aligned")
    run_pack(params=PackParams(shard_max_count=4, unseen_mask_types=[]), aligned_dir=root / "aligned",
             masked_dir=tiny / "masked", out_dir=root / "shards")
    return root / "shards"


def _balanced_pairs(lfw_dir: Path, people: list[str]) -> tuple[list[str], list[str]]:
    """Same-person pairs (round robin over people) and different-person pairs, N of each."""
    images = {p: sorted(int(f.stem.rsplit("_", 1)[1]) for f in (lfw_dir / "lfw-deepfunneled" / p).glob("*.jpg"))
              for p in people}
    per_person = [[f"{p}\t{a}\t{b}" for i, a in enumerate(images[p]) for b in images[p][i + 1:]]
                  for p in people]
    same = [lines[k] for k in range(max(map(len, per_person))) for lines in per_person if k < len(lines)]
    diff = [f"{p}\t{images[p][k % len(images[p])]}\t{q}\t{images[q][k % len(images[q])]}"
            for k in range(3) for i, p in enumerate(people) for q in people[i + 1:]]
    n = min(len(same), len(diff))
    return same[:n], diff[:n]


def write_eval_pairs(lfw_dir: Path, dest: Path | None = None) -> Path:
    """Valid LFW pair lists for a tiny subset, built from its own people: pairsDevTest.txt in View 1
    format ('N', N same, N different; test people) and pairs.txt as one View 2 set ('1 N'; train and
    test people). make_lfw_subset keeps only the official lines whose people it copied, which on a
    few people leaves no different pairs and a header that counts lines, so the evaluation refuses
    them. Writes into ``dest`` (default: the subset itself, before ingest copies the protocol)."""
    dest = dest or lfw_dir
    dest.mkdir(parents=True, exist_ok=True)
    test = [p for p, _ in _people(lfw_dir / "peopleDevTest.txt")]
    train = [p for p, _ in _people(lfw_dir / "peopleDevTrain.txt")]
    same, diff = _balanced_pairs(lfw_dir, test)
    (dest / "pairsDevTest.txt").write_text(f"{len(same)}\n" + "".join(x + "\n" for x in same + diff))
    same, diff = _balanced_pairs(lfw_dir, sorted(train + test))
    (dest / "pairs.txt").write_text(f"1\t{len(same)}\n" + "".join(x + "\n" for x in same + diff))
    return dest
