"""What the two token passes (compiled and numpy) share: their result record, the signal of
a bad chunk, the k3 polynomial and the helper threads."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
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


class _Helper:
    """A helper thread parked on a lock between calls: handing it a job and waiting for it
    costs two lock releases and two acquires, a few microseconds of CPU, where an executor's
    Future, Condition and work queue cost tens."""

    def __init__(self) -> None:
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._job: Callable[[], None] | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._serve, name="klmon-divergence", daemon=True).start()

    def _serve(self) -> None:
        while True:
            self._go.acquire()
            assert self._job is not None
            try:
                self._job()
            except BaseException as exc:  # handed to the caller by join()
                self._error = exc
            self._job = None
            self._done.release()

    def start(self, job: Callable[[], None]) -> None:
        self._job, self._error = job, None
        self._go.release()

    def join(self) -> None:
        """Waits for the job; raises what it raised."""
        self._done.acquire()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


#: Idle helpers of this process (pid: threads do not survive a fork, and a helper inherited
#: from the parent would never answer); concurrent calls each take their own.
_IDLE: tuple[int, list[_Helper]] = (os.getpid(), [])
_IDLE_LOCK = threading.Lock()


def _take_helpers(n: int) -> list[_Helper]:
    global _IDLE
    with _IDLE_LOCK:
        if _IDLE[0] != os.getpid():
            _IDLE = (os.getpid(), [])
        idle = _IDLE[1]
        taken = [idle.pop() for _ in range(min(n, len(idle)))]
    return taken + [_Helper() for _ in range(n - len(taken))]


def _give_back(helpers: list[_Helper]) -> None:
    with _IDLE_LOCK:
        if _IDLE[0] == os.getpid():
            _IDLE[1].extend(helpers)


def in_threads(n_tasks: int, n_positions: int, task: Callable[[int], None], threads: int) -> None:
    """task(0) .. task(n_tasks - 1) on up to ``threads`` (at most MAX_THREADS) threads, this
    one included; the first exception stops the remaining tasks and is raised here. How the
    work is split into tasks does not depend on ``threads``: the results are the same."""
    todo = iter(range(n_tasks))
    stop = [False]  # a list item is set atomically under the GIL (an Event costs a Condition)

    def work() -> None:
        for i in todo:  # next() on a shared range iterator is atomic under the GIL
            if stop[0]:
                return
            try:
                task(i)
            except BaseException:
                stop[0] = True
                raise

    n_threads = min(threads, MAX_THREADS, n_tasks, _CPUS)
    if n_positions < PARALLEL_MIN_POSITIONS:
        n_threads = 1
    if n_threads == 1:
        work()
        return
    helpers = _take_helpers(n_threads - 1)
    for h in helpers:
        h.start(work)
    try:
        work()
    finally:
        errors = []
        for h in helpers:
            try:
                h.join()
            except BaseException as exc:
                errors.append(exc)
        _give_back(helpers)
    if errors:
        raise errors[0]
