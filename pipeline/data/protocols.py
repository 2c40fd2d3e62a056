"""Evaluation protocols: LFW pair lists, the leak-free gallery/probe split, identity-overlap checks.

The report's evaluation let every enrolled image probe itself (a free 43% on full LFW). Here an
enrolled image is never a probe, every random choice is seeded per item from (seed, name), so the
split does not depend on file order, and train/test identity overlap is refused unless allowed.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.seeding import item_rng, rank_key

# The report's protocol: every test identity (also those with one image) enrols its first image and
# every image, the enrolled ones included, is a probe, so each enrolled image finds itself.
PAPER_PROTOCOL_NOTE = "NOT COMPARABLE: the report's leaky protocol (each enrolled image is also a probe)"


class ProtocolError(ValueError):
    """A protocol file that cannot be read as documented, or a split that breaks the protocol."""


class IdentityOverlapError(ProtocolError):
    """Train and test share identities: the test would measure memory, not recognition."""


def lfw_image_id(name: str, number: int) -> str:
    """The ingest stage's key for LFW image <name>_<NNNN>.jpg."""
    return f"{name}/{name}_{int(number):04d}"


@dataclass(frozen=True)
class Pairs:
    """Verification pairs: image ids of both sides, same-identity flag and fold per pair."""

    a: list[str]
    b: list[str]
    same: np.ndarray
    fold: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.a)

    def identities(self) -> set[str]:
        return {i.split("/", 1)[0] for i in self.a + self.b}

    def subset(self, keep: np.ndarray) -> "Pairs":
        keep = np.asarray(keep, bool)
        return Pairs([x for x, k in zip(self.a, keep) if k], [x for x, k in zip(self.b, keep) if k],
                     self.same[keep], self.fold[keep], self.source)


def parse_pairs(path: str | Path, n_folds: int = 10) -> Pairs:
    """Read an LFW pairs file.

    View 2 (``pairs.txt``, header ``10 300``): 10 sets of 300 same + 300 different pairs; the set
    is the fold. View 1 (``pairsDevTest.txt``, header ``500``): one set of N same + N different; it
    is cut into ``n_folds`` contiguous, balanced folds (same and different pairs alike), so
    thresholds are cross-validated the same way as on View 2.
    """
    path = Path(path)
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ProtocolError(f"{path}: empty pairs file")
    try:
        head = [int(x) for x in lines[0]]
    except ValueError:
        raise ProtocolError(f"{path}: first line must be 'N' or 'SETS N', got {lines[0]}") from None
    n_sets, per_set = (1, head[0]) if len(head) == 1 else (head[0], head[1]) if len(head) == 2 else (0, 0)
    if n_sets < 1 or per_set < 1:
        raise ProtocolError(f"{path}: first line must be 'N' or 'SETS N', got {lines[0]}")
    body = lines[1:]
    if len(body) != 2 * n_sets * per_set:
        raise ProtocolError(f"{path}: header promises {2 * n_sets * per_set} pairs, found {len(body)}")
    a, b, same, fold = [], [], [], []
    for i, f in enumerate(body):
        s, j = divmod(i, 2 * per_set)
        is_same = j < per_set
        try:
            if is_same and len(f) == 3:
                ia, ib = lfw_image_id(f[0], f[1]), lfw_image_id(f[0], f[2])
            elif not is_same and len(f) == 4:
                ia, ib = lfw_image_id(f[0], f[1]), lfw_image_id(f[2], f[3])
            else:
                raise ValueError
        except ValueError:
            kind = "'name n1 n2'" if is_same else "'name1 n1 name2 n2'"
            raise ProtocolError(f"{path}:{i + 2}: expected {kind}, got {' '.join(f)!r}") from None
        a.append(ia)
        b.append(ib)
        same.append(is_same)
        fold.append(s if n_sets > 1 else (j % per_set) * n_folds // per_set)
    return Pairs(a, b, np.array(same, bool), np.array(fold, np.int64), path.name)


def check_identity_overlap(train: set[str], test: set[str], *, allow: bool, what: str = "test") -> set[str]:
    """Refuse (clear error) when identities seen in training are in the test set, unless allowed."""
    overlap = set(train) & set(test)
    if overlap and not allow:
        ex = ", ".join(sorted(overlap)[:5])
        raise IdentityOverlapError(
            f"{len(overlap)} of {len(set(test))} {what} identities were also training identities "
            f"(e.g. {ex}): the metrics would measure memory, not recognition. Use a disjoint split "
            f"(LFW View 1 train vs test), or set evaluate.allow_identity_overlap: true to proceed "
            f"knowingly.")
    return overlap


@dataclass(frozen=True)
class Gallery:
    """Who is enrolled (raw images) and who probes; ``draws`` decide which probes wear the mask."""

    enrolled: list[str]
    enrolled_identity: list[str]
    probes: list[str]
    probe_identity: list[str]
    draws: np.ndarray  # uniform [0, 1) per probe, seeded from (seed, probe id)
    notes: dict = field(default_factory=dict)

    def masked(self, portion: float) -> np.ndarray:
        """Which probes use the masked twin. Nested: a probe masked at 0.5 is masked at 1.0 too."""
        if not 0.0 <= portion <= 1.0:
            raise ValueError(f"mask portion must be in [0, 1], got {portion}")
        return self.draws < portion


def _by_identity(image_ids, identities) -> dict[str, list[str]]:
    if len(image_ids) != len(identities):
        raise ValueError("image_ids and identities differ in length")
    if len(set(image_ids)) != len(image_ids):
        raise ProtocolError("duplicate image ids in the evaluation set")
    groups: dict[str, list[str]] = defaultdict(list)
    for i, ident in zip(image_ids, identities):
        groups[ident].append(i)
    return {k: sorted(v) for k, v in sorted(groups.items())}


def _probe_draws(seed: int, probes: list[str]) -> np.ndarray:
    return np.array([item_rng(seed, "mask", p).random() for p in probes], dtype=np.float64)


def build_gallery(image_ids, identities, *, seed: int) -> Gallery:
    """Leak-free split: per identity with >= 2 images one image is enrolled (seeded choice), every
    other image of that identity is a probe. Identities with one image take no part."""
    enrolled, enrolled_identity, probes, probe_identity = [], [], [], []
    singles = 0
    for ident, imgs in _by_identity(image_ids, identities).items():
        if len(imgs) < 2:
            singles += 1
            continue
        pick = int(item_rng(seed, "enrol", ident).integers(len(imgs)))
        enrolled.append(imgs[pick])
        enrolled_identity.append(ident)
        rest = imgs[:pick] + imgs[pick + 1:]
        probes += rest
        probe_identity += [ident] * len(rest)
    if not enrolled:
        raise ProtocolError("no test identity has 2 or more images: nothing to identify")
    assert not set(enrolled) & set(probes)
    return Gallery(enrolled, enrolled_identity, probes, probe_identity, _probe_draws(seed, probes),
                   {"identities_enrolled": len(enrolled), "probes": len(probes),
                    "identities_single_image_skipped": singles})


@dataclass
class OpenSet:
    """Open-set (watch-list) identification: half the gallery identities stay enrolled (their
    probes are mated searches), the other half is left out and every one of its images searches as
    a stranger (non-mated). ``*_draws`` decide which probes wear the mask, as in :class:`Gallery`."""

    enrolled: list[str]
    enrolled_identity: list[str]
    mated: list[str]
    mated_identity: list[str]
    nonmated: list[str]
    mated_draws: np.ndarray
    nonmated_draws: np.ndarray

    def masked(self, portion: float) -> tuple[np.ndarray, np.ndarray]:
        if not 0.0 <= portion <= 1.0:
            raise ValueError(f"mask portion must be in [0, 1], got {portion}")
        return self.mated_draws < portion, self.nonmated_draws < portion


def build_open_set(gallery: Gallery, *, seed: int) -> OpenSet:
    """Split a closed :class:`Gallery` by identity: the half with the smallest seeded hashes is
    left out of the enrolment (exactly half, rounded down; the choice depends on names only)."""
    names = sorted(set(gallery.enrolled_identity), key=lambda n: (rank_key(seed, "open_set", n), n))
    if len(names) < 2:
        raise ProtocolError("open-set identification needs at least 2 gallery identities")
    left_out = set(names[:len(names) // 2])
    enrolled = [(i, n) for i, n in zip(gallery.enrolled, gallery.enrolled_identity) if n not in left_out]
    mated = [(i, n) for i, n in zip(gallery.probes, gallery.probe_identity) if n not in left_out]
    nonmated = sorted([i for i, n in zip(gallery.enrolled, gallery.enrolled_identity) if n in left_out] +
                      [i for i, n in zip(gallery.probes, gallery.probe_identity) if n in left_out])
    return OpenSet([i for i, _ in enrolled], [n for _, n in enrolled], [i for i, _ in mated],
                   [n for _, n in mated], nonmated, _probe_draws(seed, [i for i, _ in mated]),
                   _probe_draws(seed, nonmated))


def build_validation_pairs(image_ids, identities, *, per_identity: int, n_folds: int, seed: int,
                           source: str = "validation") -> Pairs:
    """LFW-style verification pairs among held-out people (no pairs file exists for them).

    Each person with >= 2 images is the first side of up to ``per_identity`` same pairs (distinct
    unordered pairs of their images, a seeded choice) and of as many different pairs (one of their
    images against a seeded image of a seeded other person), so every person weighs the same and
    same/different stay balanced. A person's pairs all fall in one fold (folds dealt over the people
    in a seeded order), so the k-fold thresholds are always chosen on other people. Each person's
    draws are seeded from (seed, person): adding a person changes no other person's same pairs."""
    if per_identity < 1:
        raise ValueError(f"per_identity must be >= 1, got {per_identity}")
    groups = _by_identity(image_ids, identities)
    names = list(groups)
    multi = [n for n in names if len(groups[n]) >= 2]
    if len(multi) < 2:
        raise ProtocolError(f"{source}: {len(multi)} people with >= 2 images; verification pairs need 2")
    order = sorted(multi, key=lambda n: (rank_key(seed, "val_fold", n), n))
    fold_of = {n: i % min(n_folds, len(multi)) for i, n in enumerate(order)}  # fewer people: one fold each
    position = {n: i for i, n in enumerate(names)}
    a, b, same, fold = [], [], [], []
    for name in multi:
        imgs = groups[name]
        rng = item_rng(seed, "val_pairs", name)
        combos = [(i, j) for i in range(len(imgs)) for j in range(i + 1, len(imgs))]
        picks = sorted(rng.permutation(len(combos))[:per_identity])
        for c in picks:
            a.append(imgs[combos[c][0]])
            b.append(imgs[combos[c][1]])
        for _ in picks:
            other = int(rng.integers(len(names) - 1))
            other += other >= position[name]  # any person but this one
            pool = groups[names[other]]
            a.append(imgs[int(rng.integers(len(imgs)))])
            b.append(pool[int(rng.integers(len(pool)))])
        same += [True] * len(picks) + [False] * len(picks)
        fold += [fold_of[name]] * (2 * len(picks))
    return Pairs(a, b, np.array(same, bool), np.array(fold, np.int64), source)


def build_paper_protocol(image_ids, identities, *, seed: int) -> Gallery:
    """The report's protocol, kept only to relate to its numbers (see PAPER_PROTOCOL_NOTE).

    It enrolled the first file of every identity as listed by an unsorted os.listdir; here the
    first in sorted order, so that at least the result is reproducible.
    """
    groups = _by_identity(image_ids, identities)
    enrolled = [imgs[0] for imgs in groups.values()]
    probes = [i for imgs in groups.values() for i in imgs]
    probe_identity = [ident for ident, imgs in groups.items() for _ in imgs]
    return Gallery(enrolled, list(groups), probes, probe_identity, _probe_draws(seed, probes),
                   {"note": PAPER_PROTOCOL_NOTE, "identities_enrolled": len(enrolled),
                    "probes": len(probes), "probes_that_are_enrolled": len(enrolled)})


def read_people(path: str | Path) -> set[str]:
    """Names in an LFW people file; the one parser of them (ingest's View 1 split uses it too).

    View 1 (``peopleDevTrain.txt``, ``peopleDevTest.txt``): a count line, then that many
    ``name<TAB>n`` lines. View 2 (``people.txt``): a line with the number of sets, then per set its
    own count line and names. The counts are checked, so a truncated or hand-edited file is
    refused rather than read short (a short list would silently move people out of a split).
    """
    path = Path(path)
    lines = [(n, ln.split()) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]

    def count(i: int) -> int:
        if i >= len(lines) or len(lines[i][1]) != 1 or not lines[i][1][0].isdigit():
            where = f"line {lines[i][0]}" if i < len(lines) else "end of file"
            raise ProtocolError(f"{path}: expected a count line at {where}")
        return int(lines[i][1][0])

    view2 = len(lines) > 1 and len(lines[1][1]) == 1
    n_sets = count(0) if view2 else 1
    names: set[str] = set()
    i = 1 if view2 else 0
    for _ in range(n_sets):
        n, i = count(i), i + 1
        for lineno, f in lines[i:i + n]:
            if len(f) != 2 or not f[1].isdigit():
                raise ProtocolError(f"{path}:{lineno}: expected 'name<TAB>n', got {' '.join(f)!r}")
            names.add(f[0])
        if i + n > len(lines):
            raise ProtocolError(f"{path}: a count line promises {n} names, found {len(lines) - i}")
        i += n
    if i != len(lines):
        raise ProtocolError(f"{path}:{lines[i][0]}: more lines than the count lines promise")
    return names
