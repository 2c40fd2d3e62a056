"""Run one function over many chunks with joblib locally or on a Dask cluster.

Work is split by chunk and every random choice is seeded per item, so the results do not depend on
the backend, the number of workers or the order in which chunks finish. Results come back in input
order: all at once (:func:`map_chunks`) or one by one as soon as they and every earlier one are done
(:func:`iter_chunks`), so a stage can write a chunk's rows while later chunks still run and hold
O(one chunk) of results, not the data set's. joblib dispatches only ``2 * n_jobs`` batches ahead
(its pre-dispatch; a batch is one task, or a few when tasks take well under a second), so the
results waiting for an earlier one to finish stay a bounded number too.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

from joblib import Parallel, delayed, parallel_config
from tqdm import tqdm

from pipeline.config import ComputeParams

# Seconds to reach compute.dask_scheduler before failing (Dask's own default is 30 s, then an error
# that does not say which setting holds the address).
CONNECT_TIMEOUT_S = 10
# Tries at starting the client. Dask gives a client's IO-loop thread 10 s to start and otherwise fails
# with a bare AssertionError, which a loaded machine can hit (once in CI, on 2 busy cores).
CONNECT_TRIES = 3


class DaskSchedulerError(RuntimeError):
    """compute.dask_scheduler cannot be reached (or is not a valid address)."""


def _connect(address: str) -> Any:
    from dask.distributed import Client

    hint = ("Start one (`dask scheduler`, then `dask worker <its address>` on each machine), fix the "
            "address, or set compute.dask_scheduler to null for a local cluster of compute.n_jobs workers.")
    loop_error = None
    for _ in range(CONNECT_TRIES):
        try:
            return Client(address, timeout=CONNECT_TIMEOUT_S)
        except AssertionError as e:  # the IO-loop thread did not start in time (see CONNECT_TRIES)
            loop_error = e
        except (ValueError, TypeError) as e:
            raise DaskSchedulerError(f"compute.dask_scheduler = {address!r} is not a scheduler address like "
                                     f"'tcp://host:8786' ({type(e).__name__}: {e}). {hint}") from e
        except (OSError, TimeoutError) as e:
            raise DaskSchedulerError(f"compute.dask_scheduler = {address!r}: no Dask scheduler answered there "
                                     f"within {CONNECT_TIMEOUT_S} s ({type(e).__name__}: {e}). {hint}") from e
    raise DaskSchedulerError(f"compute.dask_scheduler = {address!r}: the Dask client's event loop did not "
                             f"start in {CONNECT_TRIES} tries (is this machine overloaded?)") from loop_error


@contextlib.contextmanager
def _dask_backend(compute: ComputeParams) -> Iterator[None]:
    from dask.distributed import Client, LocalCluster

    if compute.dask_scheduler:
        client = _connect(compute.dask_scheduler)
        cluster = None
    else:
        cluster = LocalCluster(n_workers=compute.n_jobs, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        with parallel_config(backend="dask"):
            yield
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _one_thread_each(fn: Callable[..., Any], item: Any, **kwargs: Any) -> Any:
    """Runs in a worker: the workers already fill the cores, so OpenCV's own thread pool on top
    would oversubscribe them (align on 2 cores: 24.4 -> 25.8 images/s)."""
    import cv2

    cv2.setNumThreads(1)
    return fn(item, **kwargs)


def iter_chunks(fn: Callable[..., Any], items: Sequence[Any], compute: ComputeParams,
                desc: str = "chunks", **kwargs: Any) -> Iterator[Any]:
    """``fn(item, **kwargs)`` for each item, in parallel, yielded in input order as they finish
    (with a progress bar). Close the generator (or run it to the end) to release the workers."""
    items = list(items)
    if not items:
        return
    if compute.backend == "joblib" and (compute.n_jobs == 1 or len(items) == 1):
        for item in tqdm(items, desc=desc, unit="chunk"):
            yield fn(item, **kwargs)
        return
    ctx = _dask_backend(compute) if compute.backend == "dask" else contextlib.nullcontext()
    with ctx:
        n_jobs = -1 if compute.backend == "dask" else compute.n_jobs
        gen = Parallel(n_jobs=n_jobs, return_as="generator")(delayed(_one_thread_each)(fn, item, **kwargs)
                                                             for item in items)
        yield from tqdm(gen, total=len(items), desc=desc, unit="chunk")


def map_chunks(fn: Callable[..., Any], items: Sequence[Any], compute: ComputeParams,
               desc: str = "chunks", **kwargs: Any) -> list[Any]:
    """``[fn(item, **kwargs) for item in items]``, in parallel, with a progress bar."""
    return list(iter_chunks(fn, items, compute, desc=desc, **kwargs))
