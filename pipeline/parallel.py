"""Run one function over many chunks with joblib locally or on a Dask cluster.

Work is split by chunk and every random choice is seeded per item, so the results do not depend on
the backend, the number of workers or the order in which chunks finish. Results come back in input
order.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

from joblib import Parallel, delayed, parallel_config
from tqdm import tqdm

from pipeline.config import ComputeParams


@contextlib.contextmanager
def _dask_backend(compute: ComputeParams) -> Iterator[None]:
    from dask.distributed import Client, LocalCluster

    if compute.dask_scheduler:
        client = Client(compute.dask_scheduler)
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


def map_chunks(fn: Callable[..., Any], items: Sequence[Any], compute: ComputeParams,
               desc: str = "chunks", **kwargs: Any) -> list[Any]:
    """``[fn(item, **kwargs) for item in items]``, in parallel, with a progress bar."""
    items = list(items)
    if not items:
        return []
    if compute.backend == "joblib" and (compute.n_jobs == 1 or len(items) == 1):
        return [fn(item, **kwargs) for item in tqdm(items, desc=desc, unit="chunk")]
    ctx = _dask_backend(compute) if compute.backend == "dask" else contextlib.nullcontext()
    with ctx:
        n_jobs = -1 if compute.backend == "dask" else compute.n_jobs
        gen = Parallel(n_jobs=n_jobs, return_as="generator")(delayed(_one_thread_each)(fn, item, **kwargs)
                                                             for item in items)
        return list(tqdm(gen, total=len(items), desc=desc, unit="chunk"))
