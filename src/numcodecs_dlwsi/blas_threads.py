"""One BLAS thread inside the codec's own matrix products.

The integer hyper-synthesis and the JPEG lattice filter do their exact integer arithmetic
as float64 BLAS products of small matrices. With OpenBLAS's default thread pool, each
product wakes worker threads that then busy-wait between calls, and a decoding chunk
loses more to them than the products take: on a 2-core CPU a 512² chunk decodes 2.3x
faster with BLAS held to one thread (docs/results/speed.md against speed_all_cores.md).
The results are the same bit for bit (every sum is exact, whatever the blocking).

The limit holds only while at least one of the codec's calls runs: it is taken by the
first call in and given back by the last one out, so concurrent decodes share it and the
user's own numpy work outside the codec keeps its threads. ``DLWSI_BLAS_THREADS=N`` sets
another limit, ``0`` leaves BLAS as it is.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .environment import count

ENV_BLAS_THREADS = "DLWSI_BLAS_THREADS"
DEFAULT_BLAS_THREADS = 1

_lock = threading.Lock()
_depth = 0
_limiter: Any = None


@functools.cache
def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def blas_threads() -> int:
    return count(ENV_BLAS_THREADS, DEFAULT_BLAS_THREADS, "leave BLAS as it is")


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS at one thread (``$DLWSI_BLAS_THREADS``) for the duration: process-wide,
    counted across threads."""
    global _depth, _limiter
    limit = blas_threads()
    if limit == 0:
        yield
        return
    with _lock:
        if _depth == 0:
            _limiter = _controller().limit(limits=limit, user_api="blas")
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _limiter.restore_original_limits()
                _limiter = None
