"""Protocols on LFW's real protocol files: pair parsing, the leak-free gallery, overlap refusal."""
from __future__ import annotations

import os
import random
from collections import Counter, defaultdict

import numpy as np
import pytest

from pipeline.data import protocols
from tests.conftest import lfw_root


def _lfw_test_images() -> tuple[list[str], list[str]]:
    """Image ids and identities of LFW View 1 test people, listed from the real folder."""
    root = lfw_root()
    ids, idents = [], []
    for name in sorted(protocols.read_people(root / "peopleDevTest.txt")):
        for f in sorted(os.listdir(root / "lfw-deepfunneled" / name)):
            ids.append(f"{name}/{f.rsplit('.', 1)[0]}")
            idents.append(name)
    return ids, idents


def test_view1_pairs_parse_into_ten_balanced_folds():
    p = protocols.parse_pairs(lfw_root() / "pairsDevTest.txt")
    assert len(p) == 1000 and p.same.sum() == 500
    assert p.a[0] == "Abdullah_Gul/Abdullah_Gul_0013" and p.b[0] == "Abdullah_Gul/Abdullah_Gul_0014"
    for k in range(10):
        assert (p.same[p.fold == k].sum(), (~p.same[p.fold == k]).sum()) == (50, 50)
    # different-identity pairs name two people
    diff = [(a, b) for a, b, s in zip(p.a, p.b, p.same) if not s]
    assert all(a.split("/")[0] != b.split("/")[0] for a, b in diff)


def test_view2_pairs_use_the_published_sets_as_folds():
    p = protocols.parse_pairs(lfw_root() / "pairs.txt")
    assert len(p) == 6000
    assert np.bincount(p.fold).tolist() == [600] * 10
    assert p.same[:300].all() and not p.same[300:600].any() and p.fold[599] == 0 and p.fold[600] == 1


def test_malformed_pairs_file_names_the_line(tmp_path):
    f = tmp_path / "pairs.txt"
    f.write_text("1\nAlice\t1\t2\nBob\t1\n")
    with pytest.raises(protocols.ProtocolError, match=r"pairs.txt:3: expected 'name1 n1 name2 n2'"):
        protocols.parse_pairs(f)
    f.write_text("2\nAlice\t1\t2\n")
    with pytest.raises(protocols.ProtocolError, match="promises 4 pairs, found 1"):
        protocols.parse_pairs(f)


def _groups(ids, idents) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for i, ident in zip(ids, idents):
        groups[ident].append(i)
    return groups


def test_no_enrolled_image_is_ever_a_probe_on_lfw_view1_test():
    ids, idents = _lfw_test_images()
    multi = {k: v for k, v in _groups(ids, idents).items() if len(v) >= 2}
    for seed in range(3):
        g = protocols.build_gallery(ids, idents, seed=seed)
        assert not set(g.enrolled) & set(g.probes)
        # one enrolled image per identity with >= 2 images; every other image of it probes exactly
        # once (no duplicate, none left out), under its own identity
        assert sorted(g.enrolled_identity) == sorted(multi)
        assert all(e in multi[i] for e, i in zip(g.enrolled, g.enrolled_identity))
        enrolled = set(g.enrolled)
        assert Counter(zip(g.probes, g.probe_identity)) == Counter(
            (x, i) for i, imgs in multi.items() for x in imgs if x not in enrolled)
        # View 1 test: 496 people with >= 2 images, 2,493 images -> 496 enrolled, 1,997 probes
        assert len(g.enrolled) == 496 and len(g.probes) == 2493 - 496
        assert len(set(g.enrolled_identity)) == 496
        # every probe's identity is enrolled (there is a right answer), every enrolled image is raw
        assert set(g.probe_identity) == set(g.enrolled_identity)
        for p in (0.0, 0.5, 1.0):
            assert not set(g.enrolled) & set(np.array(g.probes)[g.masked(p)].tolist())


def test_gallery_is_seeded_and_independent_of_input_order():
    ids, idents = _lfw_test_images()
    g1 = protocols.build_gallery(ids, idents, seed=7)
    order = list(range(len(ids)))
    random.Random(1).shuffle(order)
    g2 = protocols.build_gallery([ids[i] for i in order], [idents[i] for i in order], seed=7)
    assert g1.enrolled == g2.enrolled and g1.probes == g2.probes
    assert np.array_equal(g1.draws, g2.draws)
    g3 = protocols.build_gallery(ids, idents, seed=8)
    assert g3.enrolled != g1.enrolled
    # mask portions: none, about half, all; nested so a probe masked at 0.5 stays masked at 1.0
    m0, m5, m1 = g1.masked(0.0), g1.masked(0.5), g1.masked(1.0)
    assert m0.sum() == 0 and m1.all() and 0.45 < m5.mean() < 0.55 and not (m5 & ~m1).any()


def test_single_image_identities_take_no_part_and_empty_galleries_are_refused():
    g = protocols.build_gallery(["A/1", "A/2", "B/1"], ["A", "A", "B"], seed=0)
    assert g.notes["identities_single_image_skipped"] == 1 and "B/1" not in g.enrolled + g.probes
    with pytest.raises(protocols.ProtocolError, match="2 or more images"):
        protocols.build_gallery(["A/1", "B/1"], ["A", "B"], seed=0)
    with pytest.raises(protocols.ProtocolError, match="duplicate"):
        protocols.build_gallery(["A/1", "A/1"], ["A", "A"], seed=0)


def test_overlap_is_refused_unless_allowed():
    root = lfw_root()
    train = protocols.read_people(root / "peopleDevTrain.txt")
    test = protocols.read_people(root / "peopleDevTest.txt")
    assert len(train) == 4038 and len(test) == 1711
    assert protocols.check_identity_overlap(train, test, allow=False) == set()
    # View 2's people include View 1's training people: refused, or reported when allowed
    view2 = protocols.parse_pairs(root / "pairs.txt").identities()
    with pytest.raises(protocols.IdentityOverlapError, match="also training identities"):
        protocols.check_identity_overlap(train, view2, allow=False, what="View 2")
    assert len(protocols.check_identity_overlap(train, view2, allow=True)) > 100


def test_paper_protocol_is_the_leaky_one_and_says_so():
    g = protocols.build_paper_protocol(["A/1", "A/2", "B/1"], ["A", "A", "B"], seed=0)
    assert g.enrolled == ["A/1", "B/1"] and g.probes == ["A/1", "A/2", "B/1"]
    assert "NOT COMPARABLE" in g.notes["note"]
    # on LFW View 1 test: every person (single-image ones too) enrols the first image, and every
    # image, each enrolled one included, probes exactly once under its own identity
    ids, idents = _lfw_test_images()
    groups = _groups(ids, idents)
    g = protocols.build_paper_protocol(ids, idents, seed=0)
    assert len(g.enrolled) == len(groups) == 1711 and len(g.probes) == len(ids)
    assert dict(zip(g.enrolled_identity, g.enrolled)) == {k: sorted(v)[0] for k, v in groups.items()}
    assert Counter(zip(g.probes, g.probe_identity)) == Counter(zip(ids, idents))
    assert g.notes["probes_that_are_enrolled"] == len(set(g.enrolled) & set(g.probes)) == 1711


def test_read_people_reads_both_views_and_checks_the_counts(tmp_path):
    root = lfw_root()
    view1 = (protocols.read_people(root / "peopleDevTrain.txt")
             | protocols.read_people(root / "peopleDevTest.txt"))
    view2 = protocols.read_people(root / "people.txt")  # 10 sets, each with its own count line
    assert len(view2) == 5749 and view2 == view1
    bad = {
        "short.txt": ("3\nA\t1\nB\t2\n", "promises 3 names, found 2"),
        "long.txt": ("1\nA\t1\nB\t2\n", "more lines than the count lines promise"),
        "no_header.txt": ("A\t1\nB\t2\n", "expected a count line"),
        "bad_line.txt": ("2\nA\t1\nB C D\n", "expected 'name<TAB>n'"),
        "view2_short.txt": ("2\n1\nA\t1\n2\nB\t1\n", "promises 2 names, found 1"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(protocols.ProtocolError, match=message):
            protocols.read_people(tmp_path / name)
    (tmp_path / "ok.txt").write_text("2\n1\nA\t1\n2\nB\t1\nC\t3\n")
    assert protocols.read_people(tmp_path / "ok.txt") == {"A", "B", "C"}


def test_open_set_leaves_half_the_identities_out_as_strangers():
    ids, idents = _lfw_test_images()
    g = protocols.build_gallery(ids, idents, seed=0)
    o = protocols.build_open_set(g, seed=0)
    ident_of = dict(zip(ids, idents))
    enrolled = set(o.enrolled_identity)
    # exactly half of the 496 gallery identities stay enrolled, one image each
    assert len(enrolled) == len(o.enrolled) == 248
    # mated searches: the enrolled identities' probes; non-mated: every image of the others
    assert {ident_of[i] for i in o.mated} == enrolled and o.mated_identity == [ident_of[i] for i in o.mated]
    assert not {ident_of[i] for i in o.nonmated} & enrolled
    # every gallery image plays exactly one part
    assert sorted(o.enrolled + o.mated + o.nonmated) == sorted(g.enrolled + g.probes)
    # seeded by names: the same split again, another one with another seed
    assert protocols.build_open_set(g, seed=0).nonmated == o.nonmated
    assert protocols.build_open_set(g, seed=1).nonmated != o.nonmated
    mm, nm = o.masked(1.0)
    assert mm.all() and nm.all() and not o.masked(0.0)[1].any()
    with pytest.raises(protocols.ProtocolError):
        protocols.build_open_set(protocols.build_gallery(["A/1", "A/2"], ["A", "A"], seed=0), seed=0)


def _train_people_images(n_people: int) -> tuple[list[str], list[str]]:
    """Image ids and identities of the first View 1 train people with >= 2 images, and of the
    first two with one image, listed from the real folder."""
    root = lfw_root()
    ids, idents, singles = [], [], 0
    for name in sorted(protocols.read_people(root / "peopleDevTrain.txt")):
        files = sorted(os.listdir(root / "lfw-deepfunneled" / name))
        if len(files) < 2 and singles >= 2:
            continue
        if len(files) >= 2 and len({*idents}) - singles >= n_people:
            continue
        singles += len(files) < 2
        ids += [f"{name}/{f.rsplit('.', 1)[0]}" for f in files]
        idents += [name] * len(files)
    return ids, idents


def test_validation_pairs_weigh_each_person_alike_and_keep_a_person_in_one_fold():
    ids, idents = _train_people_images(30)
    ident_of = dict(zip(ids, idents))
    count = Counter(idents)
    p = protocols.build_validation_pairs(ids, idents, per_identity=3, n_folds=10, seed=0)
    first = [ident_of[a] for a in p.a]
    same = np.array([ident_of[a] == ident_of[b] for a, b in zip(p.a, p.b)])
    assert np.array_equal(same, p.same) and not any(a == b for a, b in zip(p.a, p.b))
    # hand count: min(3, n (n-1) / 2) same pairs per person with >= 2 images, as many different
    expected = {n: min(3, c * (c - 1) // 2) for n, c in count.items() if c >= 2}
    assert Counter(a for a, s in zip(first, p.same) if s) == expected
    assert Counter(a for a, s in zip(first, p.same) if not s) == expected
    assert not {n for n, c in count.items() if c < 2} & set(first)  # one image: never a first side
    same_pairs = [frozenset(x) for x, s in zip(zip(p.a, p.b), p.same) if s]
    assert len(same_pairs) == len(set(same_pairs))  # distinct unordered pairs
    # a person's pairs share one fold, so a threshold is never chosen on the person it is tried on;
    # 30 people over 10 folds: 3 each
    folds = defaultdict(set)
    for name, f in zip(first, p.fold):
        folds[name].add(int(f))
    assert all(len(f) == 1 for f in folds.values())
    assert Counter(f.pop() for f in folds.values()) == {k: 3 for k in range(10)}
    again = protocols.build_validation_pairs(ids, idents, per_identity=3, n_folds=10, seed=0)
    assert (again.a, again.b) == (p.a, p.b) and np.array_equal(again.fold, p.fold)
    other = protocols.build_validation_pairs(ids, idents, per_identity=3, n_folds=10, seed=1)
    assert (other.a, other.b) != (p.a, p.b)


def test_validation_pairs_of_a_person_do_not_depend_on_who_else_is_there():
    ids, idents = _train_people_images(12)
    p = protocols.build_validation_pairs(ids, idents, per_identity=4, n_folds=4, seed=0)
    gone = idents[-1]
    keep = [i for i, n in enumerate(idents) if n != gone]
    q = protocols.build_validation_pairs([ids[i] for i in keep], [idents[i] for i in keep], per_identity=4,
                                         n_folds=4, seed=0)
    first = p.a[0].split("/")[0]

    def same_of(pairs):
        return [(a, b) for a, b, s in zip(pairs.a, pairs.b, pairs.same) if s and a.startswith(first + "/")]

    assert same_of(p) == same_of(q) and same_of(p)
    with pytest.raises(protocols.ProtocolError, match="people with >= 2 images"):
        protocols.build_validation_pairs(["A/1", "A/2", "B/1"], ["A", "A", "B"], per_identity=2, n_folds=10, seed=0)
