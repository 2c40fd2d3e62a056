"""Shared measuring helpers for benchmarks: peak RSS of the whole process tree, one JSON line."""
from __future__ import annotations

import json
import sys
import threading
import time

import psutil


class PeakRSS:
    """Samples the RSS of this process plus all its children (joblib / dask workers) every 50 ms."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def emit(figures: dict) -> None:
    """The one JSON line a benchmark prints (stdout); progress bars go to stderr."""
    print(json.dumps(figures, sort_keys=True), file=sys.stdout, flush=True)
