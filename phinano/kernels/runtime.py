"""How the compiled kernels run: compile flags, thread count, and the hand-off of BLAS work to threads.

Nothing here computes anything; `fast.py` (the ops) and `quantized.py` (the packed-weight kernels) use it:
- `FASTMATH`: the floating-point freedoms every reduction kernel is compiled with.
- `set_threads` / `threads`: how many threads the parallel kernels and the BLAS parts use.
- `run(kernel, work, *args)`: a parallel kernel, or its serial twin (`serial_twin`) on the calling thread
  when the work is small.
- `in_parts(work, parts)`: BLAS work split into one part per thread, each with single-threaded BLAS.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

# Kernel threads that wait sleep instead of spinning (GNU OpenMP, used by Numba's "omp" threading layer).
# Measured on the 2-core Intel Xeon (Sapphire Rapids) kind, 2026-11-22, with a niced training job on both
# cores: a 2-thread 18 MB bf16 matvec took 8.3 ms with spinning waiters (they burn the time slices the
# working thread needs) and 1.4 ms with sleeping ones; on an idle machine sleeping costs ~10 us per kernel.
# Spinning was tried again on an idle AMD EPYC (Zen 3), 2026-11-30: no decode gain. Takes effect if set
# before the first parallel kernel starts the thread pool; an OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Float reassociation (vectorised reductions) and fused multiply-add; deliberately not the
# "no nans / no infs" flags of fastmath=True, so inf and nan propagate exactly as in NumPy.
FASTMATH = {"reassoc", "contract"}

# Work (elements touched) below which a parallel kernel runs on the calling thread alone: starting the
# other threads costs ~10 us on an idle machine, and was measured at ~8 ms when another process (a niced
# training job) keeps every core busy, while a 3072-wide rmsnorm takes ~10 us on one thread (the 2-core
# Intel Xeon kind, 2026-11-22).
PARALLEL_MIN_WORK = 1 << 18


def set_threads(n: int | None = None) -> int:
    """Use `n` threads (default: all cores) in the parallel kernels and in the BLAS work of long prefills.
    Returns the number now in use.

    The setting is per Python thread (Numba's rule): call it in the thread that runs the model.
    """
    n = numba.config.NUMBA_NUM_THREADS if n is None else int(n)
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    return numba.get_num_threads()


def threads() -> int:
    """The number of threads the kernels use in this Python thread (see `set_threads`)."""
    return numba.get_num_threads()


def run(kernel, work: int, *args) -> None:
    """kernel(*args), or its serial twin (`serial_twin`) on the calling thread when `work` is below
    PARALLEL_MIN_WORK elements."""
    (kernel if work >= PARALLEL_MIN_WORK else serial_twin(kernel))(*args)


_twins: dict = {}  # kernel -> its serial twin, made at the first call that needs it
_twins_lock = threading.Lock()


def serial_twin(kernel):
    """A parallel kernel's own source compiled once more without threads (`prange` then runs as `range`),
    with the same fast-math flags and the error model Numba gives a `prange` body ("numpy": a float
    division by zero gives inf or nan instead of raising, and needs no check that would stop LLVM from
    vectorising the loop: with Python's model, SwiGLU's twin ran 7x slower than its kernel on one thread).
    A kernel that is not parallel is its own twin.

    A decode step calls the small kernels (norms, rotary, SwiGLU, short attention) some 200 times, each
    right after a matrix product has streamed megabytes of weights through the caches. Run on one thread
    through the parallel machinery (`numba.set_num_threads(1)` around the call, as before), such a call
    found that machinery's code and data evicted: a 3072-wide rmsnorm took 34 us after a 12.6 MB read,
    against 6 us for the same loop compiled serial (Intel Xeon, Emerald Rapids, 2026-12-01; 8 us and
    1.6 us warm). The twin's function gets its own name (`<name>_serial`), so Numba's on-disk cache,
    which files compiled code by function name, keeps the two apart."""
    twin = _twins.get(kernel)
    if twin is not None:
        return twin
    if not getattr(kernel, "targetoptions", {}).get("parallel"):
        return kernel
    with _twins_lock:  # a server's worker and the main thread may ask at once: one twin per kernel
        if kernel not in _twins:
            f = kernel.py_func
            body = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
            body.__qualname__, body.__module__ = f.__qualname__ + "_serial", f.__module__
            _twins[kernel] = numba.njit(cache=True, fastmath=kernel.targetoptions.get("fastmath", False),
                                        error_model="numpy")(body)
    return _twins[kernel]


# BLAS work (prefill) is split by us into one independent part per thread, each run on a worker thread
# whose BLAS is single-threaded (OpenBLAS's thread-local setting): NumPy's OpenBLAS, left to its own two
# threads, synchronises them in spin loops and was measured 4x slower than one thread when another
# process (here: a training job) shares the cores. Without that OpenBLAS function, parts run in order
# in the calling thread with BLAS's own threads.


def _openblas_local_threads():
    """`openblas_set_num_threads_local` of the OpenBLAS NumPy uses (OpenBLAS >= 0.3.27), or None."""
    numpy_dir = os.path.dirname(np.__file__)
    paths = glob.glob(os.path.join(numpy_dir, os.pardir, "numpy.libs", "*openblas*"))
    try:
        with open("/proc/self/maps") as maps:
            paths += sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        pass
    for path in paths:
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    return None


_blas_set_local_threads = _openblas_local_threads()
_blas_pool: ThreadPoolExecutor | None = None


def in_parts(work, parts: int) -> None:
    """Call work(i, parts) for i in range(parts), one part per thread (`set_threads`), BLAS single-threaded
    in each. `work` must write disjoint outputs; exceptions propagate. Compiled code called from `work`
    must be serial and `nogil=True`, so that the parts really run at the same time."""
    global _blas_pool
    parts = max(1, min(parts, numba.get_num_threads()))
    if _blas_set_local_threads is None:
        for i in range(parts):
            work(i, parts)
        return
    if parts == 1:
        previous = _blas_set_local_threads(1)
        try:
            work(0, 1)
        finally:
            _blas_set_local_threads(previous)
        return
    if _blas_pool is None:
        _blas_pool = ThreadPoolExecutor(
            numba.config.NUMBA_NUM_THREADS, thread_name_prefix="phinano-blas", initializer=_blas_set_local_threads, initargs=(1,)
        )
    for _ in _blas_pool.map(lambda i: work(i, parts), range(parts)):
        pass
