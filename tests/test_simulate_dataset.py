"""scripts/simulate_dataset.py on the aligned output of a tiny real pipeline run (real LFW crops)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import recordio
from pipeline.data.images import decode_rgb
from pipeline.data.tar_chunks import list_chunks, read_chunk, record_chunks, write_chunk
from tests.conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
import simulate_dataset as sim  # noqa: E402

N, PER_ID = 60, 20


@pytest.fixture(scope="module")
def aligned(tiny_shards) -> Path:
    return tiny_shards.parent / "aligned"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def written(aligned, tmp_path_factory) -> Path:
    """N images written both ways by the CLI, run as a script."""
    out = tmp_path_factory.mktemp("sim")
    res = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "simulate_dataset.py"),
                          "--aligned", str(aligned), "--n", str(N), "--seed", "3",
                          "--rec", str(out / "rec"), "--imagefolder", str(out / "folder")],
                         capture_output=True, text=True, cwd=out)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == {"images": N, "identities": N // PER_ID}
    return out


def _read_rec(folder: Path) -> list[recordio.ImageRecord]:
    offsets = recordio.image_record_offsets(folder / "train.rec", folder / "train.idx")
    with open(folder / "train.rec", "rb") as fh:
        recs = [recordio.unpack_image(recordio.read_record(fh, off)) for _, off in offsets]
        assert [recordio.read_label(fh, off) for _, off in offsets] == [r.label for r in recs]
    return recs


def test_rec_reads_back_and_equals_the_imagefolder(written):
    recs = _read_rec(written / "rec")
    assert len(recs) == N
    assert [r.label for r in recs] == [float(i // PER_ID) for i in range(N)]
    assert [r.id for r in recs] == list(range(1, N + 1))
    assert (written / "rec" / "property").read_text() == f"{N // PER_ID},112,112\n"
    for r in recs:
        assert decode_rgb(r.image).shape == (112, 112, 3)
    folder = _files(written / "folder")
    assert list(folder) == [f"sim_{i // PER_ID:07d}/{i % PER_ID:04d}.jpg" for i in range(N)]
    assert list(folder.values()) == [r.image for r in recs]
    assert len(set(folder.values())) == N  # every image jittered differently


def test_two_runs_are_byte_identical_and_seed_matters(written, aligned, tmp_path):
    assert sim.main(["--aligned", str(aligned), "--n", str(N), "--seed", "3",
                     "--rec", str(tmp_path / "rec"), "--imagefolder", str(tmp_path / "folder")]) == 0
    for kind in ("rec", "folder"):
        assert _files(tmp_path / kind) == _files(written / kind), kind
    assert sim.main(["--aligned", str(aligned), "--n", str(N), "--seed", "4",
                     "--rec", str(tmp_path / "rec4")]) == 0
    assert (tmp_path / "rec4" / "train.rec").read_bytes() != (written / "rec" / "train.rec").read_bytes()
    images3 = {r.image for r in _read_rec(written / "rec")}
    assert not images3 & {r.image for r in _read_rec(tmp_path / "rec4")}


def test_generator_is_sorted_and_each_image_independent_of_the_rest(aligned, written):
    full = list(sim.simulate(aligned, N, PER_ID, seed=3))
    assert [(name, label) for name, label, _ in full] == [
        (f"sim_{i // PER_ID:07d}", i // PER_ID) for i in range(N)]
    assert [jpg for _, _, jpg in full] == list(_files(written / "folder").values())
    # the same identities, the last one cut short: its first images are unchanged
    assert list(sim.simulate(aligned, N - 7, PER_ID, seed=3)) == full[:N - 7]


def _crops(aligned: Path, prefix: str) -> dict[bytes, str]:
    return {m["raw.jpg"]: json.loads(m["json"])["identity"]
            for c in list_chunks(aligned / "chunks", prefix=prefix) for _, m in read_chunk(c)}


def test_only_train_crops_are_used(aligned, monkeypatch):
    train, test = _crops(aligned, "train-"), _crops(aligned, "test-")
    assert train and test and not set(train.values()) & set(test.values())
    used = []
    monkeypatch.setattr(sim, "decode_rgb", lambda data: used.append(data) or decode_rgb(data))
    n = len(set(train.values())) * 2 * 5  # every source twice over
    assert len(list(sim.simulate(aligned, n, 5, seed=0))) == n
    assert set(used) == set(train)  # every train crop, no test crop
    assert not set(used) & set(test)


def test_refuses_folders_without_train_crops(aligned, tmp_path, capsys):
    (tmp_path / "empty" / "chunks").mkdir(parents=True)
    with pytest.raises(sim.SimulateError, match="no aligned train chunks"):
        sim.simulate(tmp_path / "empty", N)
    only_test = tmp_path / "only_test" / "chunks"
    only_test.mkdir(parents=True)
    for chunk in list_chunks(aligned / "chunks", prefix="test-"):
        shutil.copy(chunk, only_test)
    record_chunks(only_test)
    assert list_chunks(only_test)
    with pytest.raises(sim.SimulateError, match="no aligned train chunks"):
        sim.simulate(only_test.parent, N)
    assert sim.main(["--aligned", str(only_test.parent), "--n", "5", "--rec", str(tmp_path / "r")]) == 2
    assert "no aligned train chunks" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # a test sample inside a train-named chunk is refused, not used
    disguised = tmp_path / "disguised" / "chunks"
    disguised.mkdir(parents=True)
    test_chunk = list_chunks(aligned / "chunks", prefix="test-")[0]
    write_chunk(disguised / "train-000000.tar", list(read_chunk(test_chunk)))
    record_chunks(disguised)
    with pytest.raises(sim.SimulateError, match="has split 'test'"):
        sim.simulate(disguised.parent, N)


def test_cli_refusals(aligned, tmp_path):
    with pytest.raises(SystemExit):
        sim.main(["--aligned", str(aligned), "--n", "5"])  # neither --rec nor --imagefolder
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.jpg").write_bytes(b"x")
    assert sim.main(["--aligned", str(aligned), "--n", "5", "--imagefolder", str(tmp_path / "full")]) == 2
    with pytest.raises(sim.SimulateError, match=">= 1"):
        sim.simulate(aligned, 0)
