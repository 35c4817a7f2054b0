"""The compiled token pass (``monitor/_kernel.c``): the same quantities as the numpy kernel in
one fused pass per token, on row ranges run by the helper threads with the GIL released."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from monitor.divergence import _passes as passes
from monitor.divergence._constants import N_BINS, TOP_FRACTION
from monitor.divergence._passes import K3_POLY, BadChunk, KernelOut, in_threads
from monitor.divergence.inputs import LOGPROB_TOLERANCE, Batch

try:
    import monitor._kernel as extension
except ImportError:  # built without a C compiler: the numpy kernel does the same work
    extension = None

#: Whether the compiled kernel may use its AVX2 loop (where the CPU has AVX2 and FMA); the
#: scalar loop computes the same quantities. Tests switch it off to cover the scalar loop.
SIMD = True


class Sums(NamedTuple):
    """The float64 sums the compiled pass adds up, in the order of ``add[]`` in
    ``monitor/_kernel.c`` (``N_SUMS`` of them)."""

    sum_nll: float  # of -log p
    sum_l: float  # of l = log p - log q
    sum_half_l2: float  # of l^2 / 2 (k2)
    sum_k3: float  # of exp(-l) - 1 + l
    sum_pos_l: float  # of the positive l
    sum_rollout_gap: float  # of rollout log-prob - policy log-prob
    sum_entropy: float
    n_tokens: float

    @classmethod
    def total(cls, per_range: np.ndarray) -> Sums:
        """The sums over every row range, from the (ranges, N_SUMS) array the pass fills."""
        return cls(*(float(x) for x in per_range.sum(axis=0)))


def run_compiled(batch: Batch, full: bool) -> KernelOut:
    """The statistics of a validated batch (``full``) or its per-sequence KLs alone;
    BadChunk when a value under the mask is out of range."""
    assert extension is not None
    given = [x for x in (batch.policy, batch.ref, batch.rollout, batch.entropies) if x is not None]
    dtype = np.result_type(*given)
    p, q, rollout, ent = (
        None if x is None else np.ascontiguousarray(x, dtype)
        for x in (batch.policy, batch.ref, batch.rollout, batch.entropies)
    )
    mask = None if batch.mask is None else np.ascontiguousarray(batch.mask)
    b, t = p.shape
    n_ranges = min(passes.MAX_THREADS, b) if p.size >= passes.PARALLEL_MIN_POSITIONS else 1
    bounds = [b * i // n_ranges for i in range(n_ranges + 1)]
    k_top = math.ceil(TOP_FRACTION * batch.n_tokens)
    seq_kl = np.empty(b)
    sums = np.zeros((n_ranges, extension.N_SUMS))
    hist = np.zeros((n_ranges, N_BINS), np.int64)
    coef = K3_POLY[np.dtype(np.float64)]
    is_double = dtype == np.float64
    # the tolerance as the inputs' dtype holds it, as the numpy kernel and the messages compare
    tol = LOGPROB_TOLERANCE if is_double else float(np.float32(LOGPROB_TOLERANCE))

    def rows(x: np.ndarray | None, i: int) -> np.ndarray | None:
        return None if x is None else x[bounds[i] : bounds[i + 1]]

    cap = [max(k_top, (bounds[i + 1] - bounds[i]) * t // 16) for i in range(n_ranges)]
    cands: list[np.ndarray] = [np.empty(c) for c in cap]
    n_cands = [0] * n_ranges

    def task(i: int) -> None:
        status, _, n_cands[i], _ = extension.stats(
            *(rows(x, i) for x in (p, q, mask, rollout, ent)),
            *(bounds[i + 1] - bounds[i], t, is_double, tol, SIMD),
            *(coef, seq_kl[bounds[i] : bounds[i + 1]], sums[i], hist[i], cands[i]),
        )
        if status:
            raise BadChunk

    in_threads(n_ranges, p.size, task)
    if not full:
        return KernelOut.seq_kl_only(batch.n_tokens, seq_kl)
    total = Sums.total(sums)
    if k_top <= sum(n_cands) and all(n <= c for n, c in zip(n_cands, cap, strict=True)):
        top = np.concatenate([c[:n] for c, n in zip(cands, n_cands, strict=True)])
    elif total.sum_pos_l == 0:  # no positive l at all (the first steps: policy == reference)
        top = np.empty(0)
    else:  # too few positive tail values, or too many to keep: gather above a sampled level
        lo = _sampled_level(p, q, mask, k_top, batch.n_tokens)
        top = _gather_positive(p, q, mask, bounds, is_double, lo)
        if len(top) < k_top and lo > 0:
            top = _gather_positive(p, q, mask, bounds, is_double, 0.0)
    if len(top) > k_top:
        top = np.partition(top, len(top) - k_top)[len(top) - k_top :]
    return KernelOut(
        n_tokens=batch.n_tokens,
        sum_l=total.sum_l,
        sum_half_l2=total.sum_half_l2,
        sum_k3=max(0.0, total.sum_k3),
        sum_nll=total.sum_nll,
        sum_rollout_gap=total.sum_rollout_gap if rollout is not None else None,
        sum_entropy=total.sum_entropy if ent is not None else None,
        sum_pos_l=total.sum_pos_l,
        top_pos_l=top,
        seq_kl=seq_kl,
        token_hist=hist.sum(axis=0),
    )


def _sampled_level(
    p: np.ndarray, q: np.ndarray, mask: np.ndarray | None, k: int, n_tokens: int
) -> float:
    """A level of l that about 3k of the n_tokens tokens reach, from a fixed sample of
    positions (same batch, same level): gathering above it keeps a few percent of the tokens,
    and at least the k largest with near certainty (the caller checks, and else takes every
    positive l). 0 when fewer than 3k tokens are positive."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, p.size, min(p.size, 16_384))
    if mask is not None:
        idx = idx[mask.reshape(-1)[idx]]  # padding may hold anything, inf included
    lv = p.reshape(-1)[idx].astype(np.float64) - q.reshape(-1)[idx]
    if len(lv) == 0:
        return 0.0
    return max(0.0, float(np.quantile(lv, max(0.0, 1.0 - 3.0 * k / n_tokens))))


def _gather_positive(
    p: np.ndarray,
    q: np.ndarray,
    mask: np.ndarray | None,
    bounds: Sequence[int],
    is_double: bool,
    lo: float,
) -> np.ndarray:
    """Every positive l >= lo, one compiled pass per row range (on the helper thread too)."""
    assert extension is not None
    t = p.shape[1]
    found: list[np.ndarray] = [np.empty(0)] * (len(bounds) - 1)

    def task(i: int) -> None:
        sl = slice(bounds[i], bounds[i + 1])
        args = (p[sl], q[sl], None if mask is None else mask[sl], sl.stop - sl.start, t)
        out = np.empty(max(1024, (sl.stop - sl.start) * t // 16))
        n = extension.collect(*args, is_double, lo, out)
        if n > len(out):  # more than room for: gather again into an exact fit
            out = np.empty(n)
            n = extension.collect(*args, is_double, lo, out)
        found[i] = out[:n]

    in_threads(len(bounds) - 1, p.size, task)
    return np.concatenate(found)
