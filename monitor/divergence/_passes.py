"""What the two token passes (compiled and numpy) share: their result record, the signal of
a bad chunk, the k3 polynomial and the helper threads."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

#: Tokens with |l| >= TAIL_START are the tail: their k3 terms are computed exactly, the rest
#: through a polynomial (see the numpy kernel's notes).
TAIL_START = 0.5
PARALLEL_MIN_POSITIONS = 1 << 17  # below this a second thread costs more than it saves
MAX_THREADS = 2
_CPUS = os.cpu_count() or 1


def _k3_coefficients(degree: int) -> np.ndarray:
    """Monomial coefficients c_0..c_degree of a polynomial close to g(l) = K(l) / l^2 on
    [-TAIL_START, TAIL_START]; g is evaluated through its Taylor series, exact here."""

    def g(x: np.ndarray) -> np.ndarray:
        lv = x * TAIL_START
        return sum((-lv) ** n / math.factorial(n + 2) for n in range(30))

    cheb = np.polynomial.chebyshev.chebinterpolate(g, degree)
    return np.polynomial.chebyshev.cheb2poly(cheb) / TAIL_START ** np.arange(degree + 1)


#: Degree per working dtype: relative error of g below 1e-6 for float32 (the precision of
#: a float32 difference of log-probs) and below 1e-12 for float64.
K3_POLY = {
    np.dtype(np.float32): _k3_coefficients(4),
    np.dtype(np.float64): _k3_coefficients(8),
}


class BadChunk(Exception):
    """A chunk holds a bad value under the mask; the caller locates the first one."""


@dataclass
class KernelOut:
    """The float64 sums, per-sequence KLs, histogram and top-1% candidates of a batch."""

    n_tokens: int
    sum_l: float
    sum_half_l2: float
    sum_k3: float
    sum_nll: float
    sum_entropy: float | None
    sum_rollout_gap: float | None
    sum_pos_l: float
    top_pos_l: np.ndarray
    seq_kl: np.ndarray
    token_hist: np.ndarray

    @classmethod
    def seq_kl_only(cls, n_tokens: int, seq_kl: np.ndarray) -> KernelOut:
        """The result of a pass asked for the per-sequence KLs alone (``sequence_kl``)."""
        return cls(n_tokens, 0, 0, 0, 0, None, None, 0, np.empty(0), seq_kl, np.empty(0))


_EXECUTOR: tuple[int, ThreadPoolExecutor] | None = None
_EXECUTOR_LOCK = threading.Lock()


def _helper_pool() -> ThreadPoolExecutor:
    """The helper threads, created on first use (again after a fork: threads do not survive
    one, and an executor inherited from the parent would wait forever)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR[0] != os.getpid():
            pool = ThreadPoolExecutor(MAX_THREADS - 1, thread_name_prefix="klmon-divergence")
            _EXECUTOR = (os.getpid(), pool)
        return _EXECUTOR[1]


def in_threads(n_tasks: int, n_positions: int, task: Callable[[int], None]) -> None:
    """task(0) .. task(n_tasks - 1) on up to MAX_THREADS threads (this one included); the
    first exception stops the remaining tasks and is raised here."""
    todo = iter(range(n_tasks))
    stop = threading.Event()

    def work() -> None:
        for i in todo:  # next() on a shared range iterator is atomic under the GIL
            if stop.is_set():
                return
            try:
                task(i)
            except BaseException:
                stop.set()
                raise

    n_threads = min(MAX_THREADS, n_tasks, _CPUS)
    if n_positions < PARALLEL_MIN_POSITIONS:
        n_threads = 1
    helpers = [_helper_pool().submit(work) for _ in range(n_threads - 1)]
    try:
        work()
    finally:
        for h in helpers:
            h.result()
