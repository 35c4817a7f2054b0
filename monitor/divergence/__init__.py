"""The per-step KL quantities (docs/ARCHITECTURE.md), computed from per-token log-probabilities.

For response token t of a sequence, ``l_t = log p - log q`` (p: policy, q: frozen reference),
taken under the response mask *before* subtracting, so that padding never leaks into a sum.

- :func:`sequence_kl`: the per-sequence penalty ``sum_t l_t`` (what PPO subtracts from rewards).
- :func:`summarize`: a :class:`StepSummary`, the scalars of one training step plus the
  per-sequence KLs and a fixed-bin token histogram (:data:`HIST_EDGES`).
- :func:`partials` / :func:`merge_partials`: the same summary for data-parallel runs, where
  each rank holds a shard of the step: every rank sends a small JSON-able dict of sufficient
  statistics and the merge finalises them exactly like :func:`summarize` does.

Inputs are (B, T) arrays with an optional mask, a list of ragged 1-D sequences, or anything
numpy can read (PyTorch tensors included, bfloat16 too, without importing torch). Bad input
raises :class:`~monitor.errors.InvalidInput` naming the argument, the problem and the first
offending position in row-major order (:mod:`monitor.divergence.inputs`, the validator the
live client shares).

The token pass is ``monitor/_kernel.c``, a small C extension built at install time (every
statistic in one read of the inputs, in double precision, AVX2 where the CPU has it, row
ranges on two threads with the GIL released; driven by ``_compiled``). Where it could not be
built (no C compiler), the numpy kernel (``_numpy_kernel``) gives the same results, slower.
Nothing else is needed at run time: numpy only, no torch. :func:`kernel` says which pass is
in use. The two agree to rounding, with one visible difference for float32 inputs: the
compiled pass takes ``log p - log q`` in double (exact), the numpy kernel in float32 (rounded
once), so a token within that rounding of a histogram edge can be counted one bin apart.

This package imports nothing of klmon's but :mod:`monitor.errors` and ``monitor._kernel``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from monitor.divergence import _compiled as compiled
from monitor.divergence._constants import (
    HIST_EDGES,
    LOGPROB_TOLERANCE,
    SCALAR_FIELDS,
    TOP_FRACTION,
)
from monitor.divergence._numpy_kernel import run_numpy
from monitor.divergence._passes import BadChunk, KernelOut
from monitor.divergence._summary import Partial, StepSummary, finalize
from monitor.divergence.inputs import (
    Batch,
    check_scalar,
    check_token_ids,
    first_problem,
    prepare,
)
from monitor.divergence.ledger import (
    LEDGER_K,
    VOCAB_TOP_N,
    LedgerTop,
    TokenLedger,
    merge_ledgers,
    token_ledger,
    top_rows,
)
from monitor.errors import InvalidInput

__all__ = [
    "HIST_EDGES",
    "LEDGER_K",
    "LOGPROB_TOLERANCE",
    "SCALAR_FIELDS",
    "TOP_FRACTION",
    "VOCAB_TOP_N",
    "LedgerTop",
    "StepSummary",
    "TokenLedger",
    "kernel",
    "merge_ledgers",
    "merge_partials",
    "partials",
    "sequence_kl",
    "summarize",
    "token_ledger",
    "top_rows",
]


def kernel() -> str:
    """Which token pass computes the statistics here: ``"c-avx2"`` (the compiled pass with
    its AVX2 loop), ``"c-scalar"`` (compiled, on a CPU without AVX2/FMA or off x86-64) or
    ``"numpy"`` (klmon was installed without a C compiler; same results, slower)."""
    if compiled.extension is None:
        return "numpy"
    return "c-avx2" if compiled.SIMD and compiled.extension.has_avx2() else "c-scalar"


def sequence_kl(policy_logprobs: Any, ref_logprobs: Any, mask: Any = None) -> np.ndarray:
    """Per-sequence KL penalty ``sum_t (log p - log q)`` over the response mask, shape (B,),
    float64. Inputs as for :func:`summarize`."""
    batch = prepare(policy_logprobs, ref_logprobs, mask)
    return _run_kernel(batch, full=False, threads=_thread_count(None)).seq_kl


def summarize(
    policy_logprobs: Any,
    ref_logprobs: Any,
    mask: Any = None,
    *,
    rewards: Any = None,
    kl_coef: float | None = None,
    rollout_logprobs: Any = None,
    entropies: Any = None,
    token_ids: Any = None,
    threads: int | None = None,
) -> StepSummary:
    """The :class:`StepSummary` of one step.

    ``policy_logprobs``/``ref_logprobs``: log-probabilities of the sampled tokens, (B, T) with
    ``mask`` (bool or 0/1, same shape; None: every position counts), or lists of 1-D
    sequences (``mask`` then None or a matching list). ``rewards``: (B,). ``entropies`` and
    ``rollout_logprobs`` (the inference engine's log-probs): per token, shaped like the
    log-probs. ``kl_coef`` is passed through. ``token_ids``: the sampled ids, (B, T) ints
    aligned with the log-probs (or a matching list of sequences): the summary then carries
    the step's :class:`~monitor.divergence.ledger.TokenLedger` (``ledger``) and
    ``vocab_top_share``; without them both are None. ``threads``: how many threads a large
    batch's token pass may use (None: up to two, this one and a helper; 1: this thread only,
    for a caller that values CPU over latency). The results do not depend on it.
    """
    part = _partial(
        policy_logprobs,
        ref_logprobs,
        mask,
        rewards,
        kl_coef,
        rollout_logprobs,
        entropies,
        token_ids,
        threads,
    )
    return finalize([part], kl_coef)


def partials(
    policy_logprobs: Any,
    ref_logprobs: Any,
    mask: Any = None,
    *,
    rewards: Any = None,
    kl_coef: float | None = None,
    rollout_logprobs: Any = None,
    entropies: Any = None,
    token_ids: Any = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Sufficient statistics of this rank's shard of a step, as a JSON-serialisable dict.

    Same arguments as :func:`summarize` (``threads`` too). Combine the dicts of all ranks with
    :func:`merge_partials`. Holds counts, float64 sums, the per-sequence KLs and rewards (so
    quantiles and standard deviations merge exactly), the token histogram, the sum of the
    positive l_t and the shard's top ``ceil(1% n_tokens)`` positive l_t, and with
    ``token_ids`` the shard's whole token ledger (every distinct id: count and sum of l_t),
    so the merged ledger is exact.
    """
    part = _partial(
        policy_logprobs,
        ref_logprobs,
        mask,
        rewards,
        kl_coef,
        rollout_logprobs,
        entropies,
        token_ids,
        threads,
    )
    return part.to_dict()


def merge_partials(
    list_of_partials: Sequence[Mapping[str, Any]], kl_coef: float | None = None
) -> StepSummary:
    """The :class:`StepSummary` of a step from the :func:`partials` of its shards.

    Every quantity is exact (up to float64 rounding of the sums) except ``top1pct_share``:
    each shard keeps only its own top ``ceil(1% n_shard)`` positive l_t, so the merged share
    is exact when no shard holds more of the global top 1% than its own top 1%, and otherwise
    an under-estimate (never an over-estimate). ``kl_coef`` defaults to the shards' value.
    """
    if isinstance(list_of_partials, Mapping) or not isinstance(list_of_partials, Sequence):
        raise InvalidInput("list_of_partials must be a list of partials() dicts")
    if not list_of_partials:
        raise InvalidInput("list_of_partials is empty: a step needs at least one shard")
    parts = [
        p if isinstance(p, Partial) else Partial.from_dict(p, f"list_of_partials[{i}]")
        for i, p in enumerate(list_of_partials)
    ]
    return finalize(parts, kl_coef)


def _partial(
    policy: Any,
    ref: Any,
    mask: Any,
    rewards: Any,
    kl_coef: float | None,
    rollout: Any,
    entropies: Any,
    token_ids: Any = None,
    threads: int | None = None,
) -> Partial:
    n_threads = _thread_count(threads)
    batch = prepare(policy, ref, mask, rollout=rollout, entropies=entropies, rewards=rewards)
    if kl_coef is not None:
        kl_coef = check_scalar(kl_coef, "kl_coef")
    ids = None
    if token_ids is not None:
        ids = check_token_ids(token_ids, batch.policy.shape, batch.layout, batch.mask)
    part = _run_kernel(batch, full=True, threads=n_threads)
    ledger = None if ids is None else _ledger(ids, batch, n_threads)
    return Partial(
        **{**part.__dict__, "rewards": batch.rewards, "kl_coef": kl_coef, "ledger": ledger}
    )


def _thread_count(threads: Any) -> int:
    """The public ``threads`` argument as a count: None is up to ``MAX_THREADS``."""
    if threads is None:
        return compiled.passes.MAX_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer) or threads < 1:
        raise InvalidInput(f"threads must be an integer >= 1 (or None), got {threads!r}")
    return int(threads)


def _ledger(ids: np.ndarray, batch: Batch, threads: int) -> TokenLedger:
    """The compiled ledger pass where it was built and the ids fit its buffers, else numpy's
    (the reference)."""
    if compiled.extension is not None and compiled.LEDGER:
        ledger = compiled.compiled_ledger(ids, batch, threads)
        if ledger is not None:
            return ledger
    return token_ledger(ids, batch.policy, batch.ref, batch.mask)


def _run_kernel(batch: Batch, full: bool, threads: int) -> KernelOut:
    """The compiled pass where it was built, else the numpy one; on a bad value, the message
    that names the first one."""
    try:
        if compiled.extension is not None:
            return compiled.run_compiled(batch, full, threads=threads)
        return run_numpy(batch, full, threads)
    except BadChunk:
        problem = first_problem(batch)
        if problem is None:  # only finite values, yet a sum overflowed
            problem = InvalidInput(
                "a sum over the batch overflows float64: the inputs hold finite values too "
                "large in magnitude (near 1e308) to summarise"
            )
        raise problem from None
