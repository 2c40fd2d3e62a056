"""Real `dvc repro` runs of this project's dvc.yaml on a tiny LFW subset."""
from __future__ import annotations

import shutil

import pytest

from tests.dvc_project import dvc, lock_hashes, make_project


@pytest.mark.slow
def test_ingest_reproducible_and_cached(tmp_path, lfw_small):
    project = make_project(tmp_path / "proj", lfw_small, {"ingest": {"chunk_size": 20}})
    dvc("repro", "ingest", cwd=project)
    first = lock_hashes(project)["ingest"]
    assert first["data/ingest"].endswith(".dir")
    again = dvc("repro", "ingest", cwd=project).stdout
    assert "didn't change" in again and "Running stage" not in again
    # a clean second run from nothing gives byte-identical outputs: the same dvc.lock hash
    shutil.rmtree(project / "data" / "ingest")
    shutil.rmtree(project / ".dvc" / "cache", ignore_errors=True)
    (project / "dvc.lock").unlink()
    out = dvc("repro", "ingest", cwd=project).stdout
    assert "Running stage 'ingest'" in out
    assert lock_hashes(project)["ingest"] == first
    # a params change that matters reruns the stage and changes the output
    params = (project / "params.yaml").read_text().replace("chunk_size: 20", "chunk_size: 7")
    (project / "params.yaml").write_text(params)
    status = dvc("status", "ingest", cwd=project).stdout
    assert "params.yaml" in status and "modified:" in status and "ingest" in status
