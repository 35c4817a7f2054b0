"""The compiled token pass (``monitor/_kernel.c``): the same quantities as the numpy kernel in
one fused pass per token, on row ranges run by the helper threads with the GIL released. The
top-1% candidates come out of that same pass, whatever the distribution of l: each row range
keeps its ``ceil(1% n_tokens)`` largest positive l in a buffer of ``CANDIDATE_ROOM`` times that
size, compacted when full (see ``cand`` in the C file)."""

from __future__ import annotations

import math
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

    keep = k_top if full else 0  # sequence_kl alone needs no candidates
    room = max(keep + 4, math.ceil(CANDIDATE_ROOM * keep))  # 4: a group of the AVX2 loop
    cands = [np.empty(room) for _ in range(n_ranges)]
    n_cands = [0] * n_ranges

    def task(i: int) -> None:
        status, _, n_cands[i], _ = extension.stats(
            *(rows(x, i) for x in (p, q, mask, rollout, ent)),
            *(bounds[i + 1] - bounds[i], t, is_double, tol, SIMD, keep),
            *(coef, seq_kl[bounds[i] : bounds[i + 1]], sums[i], hist[i], cands[i]),
        )
        if status:
            raise BadChunk

    in_threads(n_ranges, p.size, task)
    if not full:
        return KernelOut.seq_kl_only(batch.n_tokens, seq_kl)
    total = Sums.total(sums)
    top = np.concatenate([c[:n] for c, n in zip(cands, n_cands, strict=True)])
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
