"""pipeline.parallel: results in input order, and the real mask and align stages on a real external
Dask cluster (a `dask scheduler` and two `dask worker` processes on 127.0.0.1) write files
byte-identical to the joblib run; an unreachable scheduler fails fast with a message naming the key."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import parallel
from pipeline.align.stage import run_align
from pipeline.config import AlignParams, ComputeParams, MaskParams
from pipeline.mask.stage import run_mask
from pipeline.parallel import DaskSchedulerError, map_chunks
from tests.conftest import PROJECT_ROOT

HOST = "127.0.0.1"
N_WORKERS = 2
START_TIMEOUT_S = 60  # scheduler file written + both workers registered


def _slow_power(x: int, delay: float = 0.0, exponent: int = 1) -> tuple[int, int]:
    """Items given a longer delay finish later, so a result list in finishing order would differ."""
    time.sleep(delay * x)
    return x, x ** exponent


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_map_chunks_returns_results_in_input_order(n_jobs):
    items = [4, 0, 3, 1, 2]  # with n_jobs=2 the 4 (slowest) is still running when the 0 is done
    out = map_chunks(_slow_power, items, ComputeParams(n_jobs=n_jobs), delay=0.1, exponent=2)
    assert out == [(x, x * x) for x in items]
    assert map_chunks(_slow_power, [], ComputeParams(n_jobs=n_jobs)) == []
    assert map_chunks(_slow_power, (7,), ComputeParams(n_jobs=n_jobs), exponent=3) == [(7, 343)]


# --------------------------------------------------------------------------------- real Dask cluster

def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`python -m dask <args>` in its own process group (a worker's nanny has a child process)."""
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "dask", *args], cwd=PROJECT_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group, SIGKILL it if it is not gone in 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; make sure no child (the nanny's worker) stays behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("*.log")))


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """(scheduler address, connected Client, log folder) for a scheduler and two single-threaded
    workers started as separate processes on 127.0.0.1, with the project importable. Always torn down."""
    from distributed import Client

    tmp = tmp_path_factory.mktemp("dask_cluster")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    client = None
    try:
        scheduler_file = tmp / "scheduler.json"
        # --idle-timeout / --death-timeout: a safety net should this process be killed before teardown
        procs.append(_spawn(["scheduler", "--host", HOST, "--port", "0", "--no-dashboard", "--idle-timeout", "300",
                             "--scheduler-file", str(scheduler_file)], tmp / "scheduler.log", env))
        deadline = time.monotonic() + START_TIMEOUT_S
        address = None
        while address is None:
            if procs[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dask scheduler did not start\n{_logs(tmp)}")
            try:
                address = json.loads(scheduler_file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not (fully) written yet
                time.sleep(0.1)
        assert address.startswith(f"tcp://{HOST}:"), address
        for i in range(N_WORKERS):
            procs.append(_spawn(["worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                                 "--host", HOST, "--name", f"worker-{i}", "--death-timeout", "60",
                                 "--local-directory", str(tmp / f"worker-{i}")], tmp / f"worker-{i}.log", env))
        client = Client(address, timeout=30)
        try:
            client.wait_for_workers(N_WORKERS, timeout=max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            pytest.fail(f"the scheduler sees {len(client.scheduler_info()['workers'])} of {N_WORKERS} "
                        f"workers after {START_TIMEOUT_S} s\n{_logs(tmp)}")
        yield address, client, tmp
    finally:
        if client is not None:
            client.close()
        for proc in reversed(procs):  # workers first, then the scheduler
            _stop(proc)


@pytest.fixture(scope="module")
def tiny(tiny_shards) -> Path:
    """The tiny real pipeline's folder: ingest/, masked/ and aligned/ made with joblib, n_jobs=1."""
    return tiny_shards.parent


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_mask_and_align_on_a_dask_cluster_are_byte_identical_to_joblib(tiny, dask_cluster, tmp_path, monkeypatch):
    """``tiny`` comes first: the joblib reference is built before the cluster starts, not while it waits."""
    from distributed import get_task_stream

    # the stage's own client to the running scheduler: Dask's 30 s, not the stage's fail-fast 10 s
    # (seen once on a busy 2-core machine: the live scheduler answered after more than 10 s)
    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 30)
    address, client, logs = dask_cluster
    workers = set(client.scheduler_info()["workers"])
    assert len(workers) == N_WORKERS and all(w.startswith(f"tcp://{HOST}:") for w in workers)
    compute = ComputeParams(backend="dask", dask_scheduler=address)
    n_chunks = len(list((tiny / "ingest" / "chunks").glob("*.tar")))
    assert n_chunks >= 2

    # the stage opens its own Client; the scheduler's task stream records the tasks of every client
    with get_task_stream(client) as mask_tasks:
        summary = run_mask(params=MaskParams(), compute=compute, in_dir=tiny / "ingest",
                           out_dir=tmp_path / "masked")
    with get_task_stream(client) as align_tasks:
        run_align(params=AlignParams(), compute=compute, ingest_dir=tiny / "ingest",
                  masked_dir=tmp_path / "masked", out_dir=tmp_path / "aligned")

    for stage, reference_dir in (("masked", tiny / "masked"), ("aligned", tiny / "aligned")):
        reference, got = _files(reference_dir), _files(tmp_path / stage)
        assert {"status.parquet", "summary.json", "contact_sheet.png"} <= set(reference)
        assert sum(k.startswith("chunks/") and k.endswith(".tar") for k in reference) == n_chunks
        assert sorted(got) == sorted(reference), stage
        differ = [k for k in reference if got[k] != reference[k]]
        assert not differ, f"{stage}: files differ from the joblib run: {differ}"
    assert summary == json.loads((tiny / "masked" / "summary.json").read_text())

    # every chunk ran as a joblib batch on the cluster's workers (not in this process)
    for name, stream in (("mask_chunk", mask_tasks), ("align_chunk", align_tasks)):
        ours = [t for t in stream.data if t["key"].startswith("batch_of__one_thread_each_")]
        assert ours, f"no {name} task reached the scheduler: {[t['key'] for t in stream.data]}\n{_logs(logs)}"
        assert {t["worker"] for t in ours} <= workers
        assert all(t["status"] == "OK" for t in ours)
        n_calls = sum(int(t["key"].split("_calls-")[0].rsplit("_", 1)[1]) for t in ours)
        assert n_calls == n_chunks, (name, [t["key"] for t in ours])


def test_unreachable_scheduler_fails_fast_naming_the_key(monkeypatch):
    import socket

    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 2)
    address = f"tcp://{HOST}:{port}"
    start = time.monotonic()
    with pytest.raises(DaskSchedulerError, match=r"compute\.dask_scheduler = 'tcp://127\.0\.0\.1:\d+': no Dask "
                                                 r"scheduler answered there within 2 s"):
        map_chunks(_slow_power, [1, 2], ComputeParams(backend="dask", dask_scheduler=address))
    assert time.monotonic() - start < 15
    with pytest.raises(DaskSchedulerError, match=r"compute\.dask_scheduler = 'nonsense://x' is not a scheduler"):
        map_chunks(_slow_power, [1, 2], ComputeParams(backend="dask", dask_scheduler="nonsense://x"))
