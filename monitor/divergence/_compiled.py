"""The compiled token pass (``monitor/_kernel.c``): the same quantities as the numpy kernel in
one fused pass per token, on row ranges run by the helper threads with the GIL released. The
top-1% candidates come out of that same pass, whatever the distribution of l: each row range
keeps its ``ceil(1% B*T)`` largest positive l (the pass counts the tokens under the mask, so
the batch's ``ceil(1% n_tokens)`` is known after it) in a buffer of ``CANDIDATE_ROOM`` times
that size, compacted when full (see ``cand`` in the C file), above a first level sampled from
the whole batch: the same for every range, so a range that holds all of the top (a drifted
run's top often lies in a few sequences) keeps it. In the rare case where that level was too
high, the batch is read again from 0.

The token ledger (``compiled_ledger``) is a second pass of the same kind: each row range
scatter-adds its counts and sums of l into buffers indexed by id (``ledger`` in the C file),
kept between calls in a small pool, so a step costs one read of its ids and log-probs plus
O(distinct ids) to read the ledger out and clear the buffers."""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from monitor.divergence import _passes as passes
from monitor.divergence._constants import N_BINS, TOP_FRACTION
from monitor.divergence._passes import K3_POLY, BadChunk, KernelOut, in_threads
from monitor.divergence.inputs import LOGPROB_TOLERANCE, Batch
from monitor.divergence.ledger import BINCOUNT_MAX_ID, TokenLedger

try:
    import monitor._kernel as extension
except ImportError:  # built without a C compiler: the numpy kernel does the same work
    extension = None

#: Whether the compiled kernel may use its AVX2 loop (where the CPU has AVX2 and FMA); the
#: scalar loop computes the same quantities. Tests switch it off to cover the scalar loop.
SIMD = True

#: Whether the token ledger uses the compiled scatter-add (``compiled_ledger``); the numpy
#: ledger (the reference) computes the same. The benchmark switches it off to compare.
LEDGER = True

#: The candidate buffer of a row range holds this many times the number of values it keeps:
#: the larger, the fewer compactions (each a quickselect over the buffer). Tests lower it.
CANDIDATE_ROOM = 4


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
        return cls(*per_range.sum(axis=0).tolist())


def run_compiled(batch: Batch, full: bool, threads: int, sampled: bool = True) -> KernelOut:
    """The statistics of a validated batch (``full``) or its per-sequence KLs alone;
    BadChunk when a value under the mask is out of range. ``sampled``: every row range starts
    its candidates at one level from a sample of the whole batch's tokens (``first_level`` in
    the C file), else at 0. Only values above it are kept, so when fewer than the top's size
    beat it the batch is read again from 0. ``threads``: how many threads run the
    row ranges (the ranges, hence the results, are the same whatever it is)."""
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
    # the pass counts the tokens: until then, each range keeps the top 1% of all positions
    keep_most = math.ceil(TOP_FRACTION * p.size)
    seq_kl = np.empty(b)
    sums = np.zeros((n_ranges, extension.N_SUMS))
    hist = np.zeros((n_ranges, N_BINS), np.int64)
    coef = K3_POLY[np.dtype(np.float64)]
    is_double = dtype == np.float64
    # the tolerance as the inputs' dtype holds it, as the numpy kernel and the messages compare
    tol = LOGPROB_TOLERANCE if is_double else float(np.float32(LOGPROB_TOLERANCE))

    def rows(x: np.ndarray | None, i: int) -> np.ndarray | None:
        return None if x is None else x[bounds[i] : bounds[i + 1]]

    keep = keep_most if full else 0  # sequence_kl alone needs no candidates
    # one level for every range: a range may hold all of the top
    level = (
        extension.sampled_level(p, q, mask, b, t, is_double, TOP_FRACTION)
        if keep and sampled
        else 0.0
    )
    room = max(keep + 4, math.ceil(CANDIDATE_ROOM * keep))  # 4: a group of the AVX2 loop
    cands = [np.empty(room) for _ in range(n_ranges)]
    n_cands = [0] * n_ranges

    def task(i: int) -> None:
        status, _, n_cands[i], _ = extension.stats(
            *(rows(x, i) for x in (p, q, mask, rollout, ent)),
            *(bounds[i + 1] - bounds[i], t, is_double, tol, SIMD, keep, level),
            *(coef, seq_kl[bounds[i] : bounds[i + 1]], sums[i], hist[i], cands[i]),
        )
        if status:
            raise BadChunk

    in_threads(n_ranges, p.size, task, threads)
    total = Sums.total(sums)
    n_tokens = int(total.n_tokens)
    if not full:
        return KernelOut.seq_kl_only(n_tokens, seq_kl)
    k_top = math.ceil(TOP_FRACTION * n_tokens)
    top = np.concatenate([c[:n] for c, n in zip(cands, n_cands, strict=True)])
    if len(top) > k_top:
        top = np.partition(top, len(top) - k_top)[len(top) - k_top :]
    if len(top) < k_top and level > 0:
        # fewer than k_top beat the sampled level: the rest of the top is at or below it
        return run_compiled(batch, full, threads, sampled=False)
    return KernelOut(
        n_tokens=n_tokens,
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


class _LedgerBuffers:
    """One row range's ledger buffers: ``acc`` holds each id's sum and count side by side
    (``acc[id] = (sum, count)``, ids up to ``BINCOUNT_MAX_ID``; allocated zeroed and lazily by
    the OS: only the pages of ids met take memory), all zero between calls; ``touched`` lists
    the ``n`` ids counted since the last ``ledger_take``."""

    def __init__(self) -> None:
        self.acc = np.zeros((BINCOUNT_MAX_ID, 2))
        self.touched = np.empty(BINCOUNT_MAX_ID, np.int64)
        self.n = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray, int]:
        return self.acc, self.touched, self.n


#: Clean buffers ready for a call; a call takes one per row range and gives them back clean
#: (concurrent calls from several threads each take their own).
_FREE_BUFFERS: list[_LedgerBuffers] = []
_BUFFERS_LOCK = threading.Lock()


def compiled_ledger(token_ids: np.ndarray, batch: Batch, threads: int) -> TokenLedger | None:
    """The token ledger of a validated batch and its checked (B, T) int ``token_ids`` (ids
    under the mask >= 0), as ``ledger.token_ledger`` computes it; None when an id under the
    mask is ``BINCOUNT_MAX_ID`` or more (the caller then counts with ``np.unique``)."""
    assert extension is not None
    dtype = np.result_type(batch.policy, batch.ref)
    p, q = (np.ascontiguousarray(x, dtype) for x in (batch.policy, batch.ref))
    mask = None if batch.mask is None else np.ascontiguousarray(batch.mask)
    ids = np.ascontiguousarray(token_ids)
    if ids.dtype not in (np.int64, np.int32):
        ids = ids.astype(np.int64)
    b, t = p.shape
    n_ranges = min(passes.MAX_THREADS, b) if p.size >= passes.PARALLEL_MIN_POSITIONS else 1
    bounds = [b * i // n_ranges for i in range(n_ranges + 1)]
    with _BUFFERS_LOCK:
        taken = [_FREE_BUFFERS.pop() for _ in range(min(n_ranges, len(_FREE_BUFFERS)))]
    bufs = taken + [_LedgerBuffers() for _ in range(n_ranges - len(taken))]
    too_large = [False] * n_ranges

    def task(i: int) -> None:
        lo, hi = bounds[i], bounds[i + 1]
        buf = bufs[i]
        status, buf.n = extension.ledger_add(
            ids[lo:hi], p[lo:hi], q[lo:hi], None if mask is None else mask[lo:hi],
            hi - lo, t, dtype == np.float64, *buf.arrays(),
        )  # fmt: skip
        too_large[i] = status == extension.LEDGER_ID_TOO_LARGE

    # on an exception the buffers are dropped, not reused
    in_threads(n_ranges, p.size, task, threads)
    first = bufs[0]
    for other in bufs[1:]:
        first.n = extension.ledger_merge(*first.arrays(), *other.arrays())
        other.n = 0
    out_ids, out_counts, out_sums = (
        np.empty(first.n, np.int64),
        np.empty(first.n, np.int64),
        np.empty(first.n),
    )
    extension.ledger_take(*first.arrays(), out_ids, out_counts, out_sums)
    first.n = 0
    with _BUFFERS_LOCK:
        _FREE_BUFFERS.extend(bufs)
    if any(too_large):
        return None
    return TokenLedger(out_ids, out_counts, out_sums)
