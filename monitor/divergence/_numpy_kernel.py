"""The numpy token pass, for installs without ``monitor._kernel``: whole-chunk passes on up
to two threads.

Per token only cheap, branch-free passes run over every position: mask, subtract, compare,
clip, multiply, sums and einsum dot products. Two families of tokens are then told apart:

- central tokens, |l| < TAIL_START (nearly all of them): their k3 terms come from power
  sums. K(l) = exp(-l) - 1 + l = l^2 g(l) with g smooth, so sum_t K(l_t) = sum_n c_n M_(n+2)
  where M_n = sum_t l_t^n and c_n are the coefficients of a polynomial close to g on the
  central range (Chebyshev interpolation). No exp per token, and no loss of precision for
  tiny l (where exp(-l) - 1 + l cancels). Their histogram bins come from three comparisons.
- tail tokens, |l| >= TAIL_START (a few percent): gathered into a small array where k3 is
  exact, the histogram is a bincount and the top-1% candidates are found. The power sums
  run over l clipped to +-TAIL_START, so the tail's share of them is known exactly and is
  taken back out.

Gathering is the costly step (a data-dependent branch per position), which is why the tail
starts at 0.5 nats rather than lower. Threads: every pass here releases the GIL (BLAS-backed
gufuncs such as np.vecdot hold it, so they are avoided) and a chunk's passes are long (a
quarter of a million positions); two threads still gain only about 1.3x, as each hand-back
of the GIL waits for the other thread. Each thread owns its buffers and each chunk writes its
own record, so results do not depend on scheduling.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace

import numpy as np

from monitor.divergence._constants import BIN_OFFSET, BIN_SCALE, N_BINS, TOP_FRACTION, ZERO_BIN
from monitor.divergence._passes import (
    K3_POLY,
    TAIL_START,
    BadChunk,
    KernelOut,
    in_threads,
)
from monitor.divergence.inputs import LOGPROB_TOLERANCE, Batch

_CENTRAL_EDGES = (-0.25, 0.0, 0.25)  # inner edges of the central bins 38..41 = [-0.5, 0.5)
_CENTRAL_FIRST_BIN = ZERO_BIN - 2

CHUNK_POSITIONS = 1 << 18  # positions per chunk: long numpy passes, buffers in L2/L3
_BLOCK = 4096  # dot products in blocks, float64 across blocks


@dataclass
class _ChunkStats:
    """What one chunk contributes; sums are float64."""

    sum_nll: float
    sum_rollout_gap: float
    sum_entropy: float
    sum_pos_l: float
    moments: np.ndarray  # M_2..M_(degree+2) of l clipped to +-TAIL_START
    n_tail_pos: int  # tail tokens, clipped to +TAIL_START in the moments
    n_tail_neg: int  # and to -TAIL_START
    tail_half_l2: float
    tail_k3: float
    hist: np.ndarray
    top: np.ndarray  # the chunk's largest positive l: a superset of its share of the top 1%


def _sum(x: np.ndarray) -> float:
    """Sum of an array: numpy's pairwise summation (error ~ log n ulps), which releases the
    GIL (BLAS-backed gufuncs such as ``np.vecdot`` hold it and serialise the threads)."""
    with np.errstate(over="ignore", invalid="ignore"):  # the caller refuses a non-finite sum
        return float(np.add.reduce(x, axis=None))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """<a, b> of two contiguous arrays of one shape: einsum over blocks (float accumulation
    within a block, float64 across blocks), GIL released and single-threaded, unlike BLAS."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = len(fa) - len(fa) % _BLOCK
    head = np.einsum("ij,ij->i", fa[:n].reshape(-1, _BLOCK), fb[:n].reshape(-1, _BLOCK))
    return float(np.sum(head, dtype=np.float64)) + float(np.einsum("i,i", fa[n:], fb[n:]))


class _Worker:
    """One thread's buffers and the passes over one chunk of rows."""

    def __init__(self, batch: Batch, rows: int, full: bool, k_top: int) -> None:
        t = batch.policy.shape[1]
        given = (batch.policy, batch.ref, batch.rollout, batch.entropies)
        self.dtype = np.result_type(*(x for x in given if x is not None))
        self.batch, self.rows, self.full, self.k_top = batch, rows, full, k_top
        self.buf = [np.empty((rows, t), self.dtype) for _ in range(3 if full else 2)]
        self.flag = np.empty((rows, t), np.bool_)

    def run(self, r0: int, seq_kl: np.ndarray) -> _ChunkStats | None:
        """Statistics of rows r0:r0+rows; the chunk's per-sequence KLs go into seq_kl."""
        b = self.batch
        r1 = min(r0 + self.rows, b.policy.shape[0])
        arrays = [
            None if x is None else x[r0:r1] for x in (b.policy, b.ref, b.rollout, b.entropies)
        ]
        mask = None if b.mask is None else b.mask[r0:r1]
        stats = self._chunk(*arrays, mask, seq_kl[r0:r1])
        if stats is False:
            # Fast checks failed: masked positions may hold garbage (NaN, inf), or a real
            # problem sits under the mask. Zero the masked positions and look again.
            if mask is None:
                raise BadChunk
            clean = [None if x is None else np.where(mask, x, 0) for x in arrays]
            stats = self._chunk(*clean, mask, seq_kl[r0:r1])
            if stats is False:
                raise BadChunk
        return stats

    def _masked(self, x: np.ndarray, mask: np.ndarray | None, out: np.ndarray) -> np.ndarray:
        """x with masked positions zeroed (finite padding such as TRL's +1.0 included; NaN or
        inf padding turns into NaN, fails the checks and sends the chunk to the slow path)."""
        if mask is None:
            return x
        with np.errstate(invalid="ignore"):
            return np.multiply(x, mask, out=out)

    def _chunk(
        self,
        p: np.ndarray,
        q: np.ndarray,
        rollout: np.ndarray | None,
        ent: np.ndarray | None,
        mask: np.ndarray | None,
        seq_kl: np.ndarray,
    ) -> _ChunkStats | bool | None:
        """None when only seq_kl was asked for; False (nothing else recorded) when a fast
        check fails."""
        nr = len(p)
        lt, x = (buf[:nr] for buf in self.buf[:2])
        pm = self._masked(p, mask, lt)
        if not pm.max() <= LOGPROB_TOLERANCE:  # NaN fails too
            return False
        if self.full:
            sum_nll = -_sum(pm)
            extras = self._optional_sums(pm, rollout, ent, mask, x)
            if not math.isfinite(sum_nll) or extras is None:
                return False
        qm = self._masked(q, mask, x)
        if not qm.max() <= LOGPROB_TOLERANCE:
            return False
        with np.errstate(invalid="ignore", over="ignore"):
            np.subtract(pm, qm, out=lt)
        # float64 accumulation: float32 row sums lose the small l between large ones
        np.add.reduce(lt, axis=1, dtype=np.float64, out=seq_kl)
        if not np.isfinite(seq_kl).all():
            return False
        if not self.full:
            return None
        return self._token_stats(lt, x, self.buf[2][:nr], mask, sum_nll, extras)

    def _optional_sums(
        self,
        pm: np.ndarray,
        rollout: np.ndarray | None,
        ent: np.ndarray | None,
        mask: np.ndarray | None,
        x: np.ndarray,
    ) -> tuple[float, float] | None:
        """Sums of the rollout gap and of the entropies (0 when not given); None when a value
        is out of range."""
        gap = entropy = 0.0
        if rollout is not None:
            rm = self._masked(rollout, mask, x)
            if not rm.max() <= LOGPROB_TOLERANCE:
                return None
            gap = _sum(np.subtract(rm, pm, out=x))
        if ent is not None:
            em = self._masked(ent, mask, x)
            if not em.min() >= -LOGPROB_TOLERANCE:
                return None
            entropy = _sum(em)
        if not (math.isfinite(gap) and math.isfinite(entropy)):
            return None
        return gap, entropy

    def _token_stats(
        self,
        lt: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        mask: np.ndarray | None,
        sum_nll: float,
        extras: tuple[float, float],
    ) -> _ChunkStats:
        """Token-level statistics of a valid chunk; lt is clobbered."""
        flag = self.flag[: len(lt)]
        below = np.array([np.count_nonzero(np.less(lt, e, out=flag)) for e in _CENTRAL_EDGES])
        # sum of the positive part, directly: (sum |l| + sum l) / 2 cancels when most l < 0
        sum_pos = float(np.add.reduce(np.clip(lt, 0, np.finfo(lt.dtype).max, out=x), axis=None,
                                      dtype=np.float64))  # fmt: skip
        np.greater_equal(np.abs(lt, out=x), TAIL_START, out=flag)
        tail = np.compress(flag.reshape(-1), lt.reshape(-1)) if flag.any() else lt[:0, 0]
        # top-1% candidates: the positive tail, or the whole chunk when that holds too few
        top = tail[tail > 0]
        if len(top) > self.k_top:
            top = np.partition(top, len(top) - self.k_top)[len(top) - self.k_top :]
        elif len(top) < self.k_top:
            flat = lt.reshape(-1)
            top = np.partition(flat, max(0, len(flat) - self.k_top))[-self.k_top :]
            top = top[top > 0]
        # power sums of lt clipped to the central range
        ls = np.clip(lt, -TAIL_START, TAIL_START, out=lt)
        degree = len(K3_POLY[lt.dtype]) - 1
        moments = np.empty(degree + 1)
        moments[0] = _dot(ls, ls)
        prev, cur = ls, x
        for i in range(1, len(moments), 2):  # M_(i+2), M_(i+3) from ls^j and ls^(j+1)
            np.multiply(prev, ls, out=cur)
            moments[i] = _dot(prev, cur)
            if i + 1 < len(moments):
                moments[i + 1] = _dot(cur, cur)
            prev, cur = cur, (y if cur is x else x)
        n_tail_neg = int(np.count_nonzero(tail < 0))
        hist = _tail_histogram(tail)
        # central bins from the comparison counts; masked positions hold lt = 0 (bin 40)
        counts = [n_tail_neg, *below, lt.size - (len(tail) - n_tail_neg)]
        hist[_CENTRAL_FIRST_BIN : _CENTRAL_FIRST_BIN + 4] += np.diff(counts)
        hist[ZERO_BIN] -= 0 if mask is None else mask.size - np.count_nonzero(mask)
        return _ChunkStats(
            sum_nll=sum_nll,
            sum_rollout_gap=extras[0],
            sum_entropy=extras[1],
            sum_pos_l=sum_pos,
            moments=moments,
            n_tail_pos=len(tail) - n_tail_neg,
            n_tail_neg=n_tail_neg,
            tail_half_l2=0.5 * _dot(tail, tail),
            tail_k3=_tail_k3(tail),
            hist=hist,
            top=top.astype(np.float64),
        )


def _tail_histogram(tail: np.ndarray) -> np.ndarray:
    """Bin counts of the tail values (floor of an exact product by 4: no rounding at edges)."""
    idx = np.floor(tail.astype(np.float64) * BIN_SCALE) + BIN_OFFSET
    return np.bincount(np.clip(idx, 0, N_BINS - 1).astype(np.intp), minlength=N_BINS)


def _tail_k3(tail: np.ndarray) -> float:
    """Sum of exp(-lt) - 1 + lt over tail values (|lt| >= 1/2: no cancellation). float32 tails
    use numpy's vectorised float32 exp (float64 exp is a scalar libm call, ~10 ns a token)."""
    if tail.dtype == np.float32:
        with np.errstate(over="ignore"):
            e = np.exp(-tail)
        if np.isfinite(e).all():
            return float(np.sum(e.astype(np.float64) - 1.0 + tail))
    t = tail.astype(np.float64)
    return float(np.sum(np.expm1(-t) + t))


def run_numpy(batch: Batch, full: bool, threads: int) -> KernelOut:
    if batch.mask is not None and batch.n_tokens == batch.mask.size:
        batch = replace(batch, mask=None)  # every position counts: skip the masking work
    b, t = batch.policy.shape
    rows = max(1, min(b, CHUNK_POSITIONS // max(t, 1)))
    starts = range(0, b, rows)
    k_top = math.ceil(TOP_FRACTION * batch.n_tokens)
    seq_kl = np.empty(b)
    stats: list[_ChunkStats | None] = [None] * len(starts)
    workers: dict[int, _Worker] = {}

    def task(c: int) -> None:
        me = threading.get_ident()
        if me not in workers:
            workers[me] = _Worker(batch, rows, full, k_top)
        stats[c] = workers[me].run(starts[c], seq_kl)

    in_threads(len(starts), batch.policy.size, task, threads)
    if not full:
        return KernelOut.seq_kl_only(batch.n_tokens, seq_kl)
    return _collect(batch, [s for s in stats if s is not None], seq_kl, k_top)


def _collect(batch: Batch, chunks: list[_ChunkStats], seq_kl: np.ndarray, k_top: int) -> KernelOut:
    top = np.concatenate([c.top for c in chunks])
    if len(top) > k_top:
        top = np.partition(top, len(top) - k_top)[len(top) - k_top :]
    moments = np.sum([c.moments for c in chunks], axis=0)
    # the tail tokens sit at exactly +-TAIL_START in the power sums: take them out
    powers = np.arange(2, len(moments) + 2)
    n_pos = sum(c.n_tail_pos for c in chunks)
    n_neg = sum(c.n_tail_neg for c in chunks)
    moments -= n_pos * TAIL_START**powers + n_neg * (-TAIL_START) ** powers
    coef = K3_POLY[np.result_type(batch.policy.dtype, batch.ref.dtype)]

    def total(name: str) -> float:
        return sum(getattr(c, name) for c in chunks)

    return KernelOut(
        n_tokens=batch.n_tokens,
        sum_l=float(np.sum(seq_kl)),
        sum_half_l2=0.5 * float(moments[0]) + total("tail_half_l2"),
        sum_k3=max(0.0, float(moments @ coef)) + total("tail_k3"),
        sum_nll=total("sum_nll"),
        sum_rollout_gap=total("sum_rollout_gap") if batch.rollout is not None else None,
        sum_entropy=total("sum_entropy") if batch.entropies is not None else None,
        sum_pos_l=total("sum_pos_l"),
        top_pos_l=top,
        seq_kl=seq_kl,
        token_hist=np.sum([c.hist for c in chunks], axis=0, dtype=np.int64),
    )
