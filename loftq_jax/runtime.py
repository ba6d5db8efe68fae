"""Process settings: the allocator and LAPACK's threads, which make JAX on CPU faster for weight-sized arrays,
and Ctrl-C handling that no garbage-collection callback can drop.

jaxlib's CPU client allocates each output buffer with malloc from its worker threads. glibc serves a request
above its mmap threshold (32 MiB at most) with a fresh mmap and unmaps it on free, and a worker thread's arena
falls back to mmap as well because it cannot grow past 64 MiB. So each output of a (4096, 4096) float32
weight is new memory that the kernel fills page by page: 16384 page faults, about 15 ms, on every call
(measured with jax 0.10.2 and glibc 2.36 by `experiments/bench_quantize.py`). Keeping all allocations in the
main heap and never trimming it lets freed buffers be reused.
"""

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

DISABLE_ENV = "LOFTQ_JAX_DEFAULT_MALLOC"
BLAS_THREADS_ENV = "LOFTQ_JAX_BLAS_THREADS"

_interrupted = threading.Event()


def configure() -> None:
    """Apply `configure_allocator` and `limit_blas_threads`; the `loftq-jax` command calls it first."""
    configure_allocator()
    limit_blas_threads()


def configure_allocator() -> bool:
    """Make glibc reuse freed large buffers: one arena, no mmap per buffer, no trimming.

    Call it before the first JAX computation. Freed memory then stays with the process for reuse, so the
    resident size stays at its high-water mark instead of shrinking. Setting the
    environment variable LOFTQ_JAX_DEFAULT_MALLOC=1 keeps glibc's defaults.

    Returns:
      True when the settings were applied; False on platforms without glibc or when disabled.
    """
    if os.environ.get(DISABLE_ENV) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False

    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    applied = all(mallopt(parameter, value) == 1 for parameter, value in settings)
    if not applied:
        logger.warning("glibc rejected the allocator settings; large JAX buffers may page-fault on every call")
    return applied


def limit_blas_threads(threads: int | None = None) -> int:
    """Run the OpenBLAS that JAX's CPU LAPACK calls (QR, SVD, eigh) use on `threads` threads (default 1).

    jaxlib calls LAPACK through SciPy's OpenBLAS, whose threads spin while they wait for each other. With
    another process on one of 2 cores, a LoftQ call of a (4096, 4096) weight took 12 s or more on 2 threads
    and 1.2 s on 1 (measured with jax 0.10.2 and OpenBLAS 0.3.30). JAX's own matmuls run on XLA's thread pool and keep every core. An exact SVD of a large weight
    is the one case that loses speed on an idle machine. The environment variable LOFTQ_JAX_BLAS_THREADS
    overrides the default.

    Returns:
      The thread count applied.
    """
    import scipy.linalg.cython_lapack  # noqa: F401  (loads the OpenBLAS that jaxlib's LAPACK kernels call)
    from threadpoolctl import threadpool_limits

    if threads is None:
        threads = int(os.environ.get(BLAS_THREADS_ENV, "1"))
    threadpool_limits(threads, user_api="blas")
    return threads


def _on_interrupt(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def remember_interrupts():
    """Within the block, Ctrl-C raises KeyboardInterrupt as usual and is also remembered for `raise_if_interrupted`.

    Python prints and drops an exception raised inside a garbage-collection callback, and jaxlib runs one after
    each collection, so a Ctrl-C that lands there would otherwise be lost. Call it from the main thread.
    """
    _interrupted.clear()
    previous = signal.signal(signal.SIGINT, _on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came within `remember_interrupts`, even if that first one was dropped."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
