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
offending position in row-major order.

Speed: the token pass is ``monitor/_kernel.c``, a small C extension built at install time
(every statistic in one read of the inputs, in double precision, AVX2 where the CPU has it,
two row ranges on two threads with the GIL released). Where it could not be built (no C
compiler), the numpy kernel below gives the same results a few times slower. Nothing else is
needed at run time: numpy only, no torch. :func:`kernel` says which pass is in use; see
``benchmarks/bench_divergence.py`` for the figures. The two agree to rounding, with one
visible difference for float32 inputs: the compiled pass takes ``log p - log q`` in double
(exact), the numpy kernel in float32 (rounded once), so a token within that rounding of a
histogram edge can be counted one bin apart.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.errors import InvalidInput

try:
    import monitor._kernel as _compiled
except ImportError:  # built without a C compiler: the numpy kernel does the same work
    _compiled = None

__all__ = [
    "HIST_EDGES",
    "LOGPROB_TOLERANCE",
    "StepSummary",
    "kernel",
    "merge_partials",
    "partials",
    "sequence_kl",
    "summarize",
]

#: Edges of the token histogram of ``l_t``: 80 bins of 0.25 nats on [-10, 10]. Bins are
#: half-open ``[e_i, e_i+1)``; values below -10 are counted in the first bin and values at or
#: above +10 in the last, so the counts always sum to ``n_tokens``.
HIST_EDGES: np.ndarray = np.linspace(-10.0, 10.0, 81)
HIST_EDGES.flags.writeable = False
_N_BINS = len(HIST_EDGES) - 1
_BIN_SCALE = _N_BINS / (HIST_EDGES[-1] - HIST_EDGES[0])  # bins per nat (4)
_BIN_OFFSET = -HIST_EDGES[0] * _BIN_SCALE  # bin index = floor(l * scale + offset)
_ZERO_BIN = int(_BIN_OFFSET)  # masked positions hold l = 0 and land here; they are removed

#: A log-probability may exceed 0 by this much before it is rejected: fp16/bf16 rounding of
#: values near 0 (bf16 has 8 significant bits) produces tiny positive numbers.
LOGPROB_TOLERANCE = 1e-3

#: top1pct_share looks at the top ``ceil(TOP_FRACTION * n_tokens)`` tokens by l_t.
TOP_FRACTION = 0.01

#: The scalar quantities of a step, in order: StepSummary's fields and the steps columns.
SCALAR_FIELDS = (
    "kl_mean",
    "kl_std",
    "kl_min",
    "kl_p05",
    "kl_p50",
    "kl_p95",
    "kl_p99",
    "kl_max",
    "k1",
    "k2",
    "k3",
    "neg_kl_frac",
    "top1pct_share",
    "resp_len_mean",
    "policy_nll",
    "entropy_mean",
    "reward_mean",
    "reward_std",
    "kl_coef",
    "rollout_gap",
    "n_sequences",
    "n_tokens",
)
_QUANTILES = (0.05, 0.50, 0.95, 0.99)
_PARTIAL_FORMAT = "klmon.partials/1"


@dataclass(frozen=True)
class StepSummary:
    """The KL quantities of one step (docs/ARCHITECTURE.md). Scalars are floats, or None when their
    input was not given; ``seq_kl`` and ``token_hist`` are arrays (not part of :meth:`as_dict`).
    """

    kl_mean: float
    kl_std: float
    kl_min: float
    kl_p05: float
    kl_p50: float
    kl_p95: float
    kl_p99: float
    kl_max: float
    k1: float
    k2: float
    k3: float
    neg_kl_frac: float
    top1pct_share: float
    resp_len_mean: float
    policy_nll: float
    entropy_mean: float | None
    reward_mean: float | None
    reward_std: float | None
    kl_coef: float | None
    rollout_gap: float | None
    n_sequences: int
    n_tokens: int
    seq_kl: np.ndarray
    token_hist: np.ndarray

    def as_dict(self) -> dict[str, float | int | None]:
        """The scalar fields (the ``steps`` columns) as plain Python numbers."""
        return {name: getattr(self, name) for name in SCALAR_FIELDS}


# --------------------------------------------------------------------------------------------
# Sufficient statistics of one shard (one rank's part of a step)


@dataclass(frozen=True)
class _Partial:
    """Mergeable statistics of a shard. Token-level sums are float64; ``seq_kl`` and
    ``rewards`` are kept whole (B is small) so quantiles and standard deviations stay exact."""

    n_tokens: int
    sum_l: float
    sum_half_l2: float
    sum_k3: float
    sum_nll: float
    sum_entropy: float | None
    sum_rollout_gap: float | None
    sum_pos_l: float
    top_pos_l: np.ndarray  # the top ceil(1% n_tokens) positive l_t of the shard
    seq_kl: np.ndarray
    token_hist: np.ndarray
    rewards: np.ndarray | None
    kl_coef: float | None

    def to_dict(self) -> dict[str, Any]:
        def opt(x: float | None) -> float | None:
            return None if x is None else float(x)

        return {
            "format": _PARTIAL_FORMAT,
            "n_sequences": len(self.seq_kl),
            "n_tokens": int(self.n_tokens),
            "sum_l": float(self.sum_l),
            "sum_half_l2": float(self.sum_half_l2),
            "sum_k3": float(self.sum_k3),
            "sum_nll": float(self.sum_nll),
            "sum_entropy": opt(self.sum_entropy),
            "sum_rollout_gap": opt(self.sum_rollout_gap),
            "sum_pos_l": float(self.sum_pos_l),
            "top_pos_l": np.sort(self.top_pos_l)[::-1].tolist(),
            "seq_kl": self.seq_kl.tolist(),
            "token_hist": self.token_hist.tolist(),
            "rewards": None if self.rewards is None else self.rewards.tolist(),
            "kl_coef": opt(self.kl_coef),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> _Partial:
        if d.get("format") != _PARTIAL_FORMAT:
            raise InvalidInput(
                f"{where} is not a klmon partial (format {d.get('format')!r}, "
                f"expected {_PARTIAL_FORMAT!r})"
            )
        try:
            seq_kl = np.asarray(d["seq_kl"], dtype=np.float64).reshape(-1)
            hist = np.asarray(d["token_hist"], dtype=np.int64).reshape(-1)
            rewards = d.get("rewards")
            part = cls(
                n_tokens=int(d["n_tokens"]),
                sum_l=float(d["sum_l"]),
                sum_half_l2=float(d["sum_half_l2"]),
                sum_k3=float(d["sum_k3"]),
                sum_nll=float(d["sum_nll"]),
                sum_entropy=_opt_float(d.get("sum_entropy")),
                sum_rollout_gap=_opt_float(d.get("sum_rollout_gap")),
                sum_pos_l=float(d["sum_pos_l"]),
                top_pos_l=np.asarray(d["top_pos_l"], dtype=np.float64).reshape(-1),
                seq_kl=seq_kl,
                token_hist=hist,
                rewards=None if rewards is None else np.asarray(rewards, dtype=np.float64),
                kl_coef=_opt_float(d.get("kl_coef")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{where} is malformed: {exc}") from None
        if len(hist) != _N_BINS or len(seq_kl) != int(d.get("n_sequences", len(seq_kl))):
            raise InvalidInput(f"{where} is malformed: histogram or seq_kl has the wrong length")
        return part


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


# --------------------------------------------------------------------------------------------
# Public API


def kernel() -> str:
    """Which token pass computes the statistics here: ``"c-avx2"`` (the compiled pass with
    its AVX2 loop), ``"c-scalar"`` (compiled, on a CPU without AVX2/FMA or off x86-64) or
    ``"numpy"`` (klmon was installed without a C compiler; same results, slower)."""
    if _compiled is None:
        return "numpy"
    return "c-avx2" if _SIMD and _compiled.has_avx2() else "c-scalar"


def sequence_kl(policy_logprobs: Any, ref_logprobs: Any, mask: Any = None) -> np.ndarray:
    """Per-sequence KL penalty ``sum_t (log p - log q)`` over the response mask, shape (B,),
    float64. Inputs as for :func:`summarize`."""
    batch = _prepare(policy_logprobs, ref_logprobs, mask)
    return _run_kernel(batch, full=False).seq_kl


def summarize(
    policy_logprobs: Any,
    ref_logprobs: Any,
    mask: Any = None,
    *,
    rewards: Any = None,
    kl_coef: float | None = None,
    rollout_logprobs: Any = None,
    entropies: Any = None,
) -> StepSummary:
    """The :class:`StepSummary` of one step.

    ``policy_logprobs``/``ref_logprobs``: log-probabilities of the sampled tokens, (B, T) with
    ``mask`` (bool or 0/1, same shape; None: every position counts), or lists of 1-D
    sequences (``mask`` then None or a matching list). ``rewards``: (B,). ``entropies`` and
    ``rollout_logprobs`` (the inference engine's log-probs): per token, shaped like the
    log-probs. ``kl_coef`` is passed through.
    """
    part = _partial(
        policy_logprobs, ref_logprobs, mask, rewards, kl_coef, rollout_logprobs, entropies
    )
    return _finalize([part], kl_coef)


def partials(
    policy_logprobs: Any,
    ref_logprobs: Any,
    mask: Any = None,
    *,
    rewards: Any = None,
    kl_coef: float | None = None,
    rollout_logprobs: Any = None,
    entropies: Any = None,
) -> dict[str, Any]:
    """Sufficient statistics of this rank's shard of a step, as a JSON-serialisable dict.

    Same arguments as :func:`summarize`. Combine the dicts of all ranks with
    :func:`merge_partials`. Holds counts, float64 sums, the per-sequence KLs and rewards (so
    quantiles and standard deviations merge exactly), the token histogram, the sum of the
    positive l_t and the shard's top ``ceil(1% n_tokens)`` positive l_t.
    """
    part = _partial(
        policy_logprobs, ref_logprobs, mask, rewards, kl_coef, rollout_logprobs, entropies
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
        p if isinstance(p, _Partial) else _Partial.from_dict(p, f"list_of_partials[{i}]")
        for i, p in enumerate(list_of_partials)
    ]
    return _finalize(parts, kl_coef)


def _partial(
    policy: Any,
    ref: Any,
    mask: Any,
    rewards: Any,
    kl_coef: float | None,
    rollout: Any,
    entropies: Any,
) -> _Partial:
    batch = _prepare(policy, ref, mask, rollout=rollout, entropies=entropies, rewards=rewards)
    if kl_coef is not None:
        kl_coef = _scalar(kl_coef, "kl_coef")
    part = _run_kernel(batch, full=True)
    return _Partial(**{**part.__dict__, "rewards": batch.rewards, "kl_coef": kl_coef})


def _scalar(x: Any, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} is {x!r}: expected a number") from None
    if not math.isfinite(v):
        raise InvalidInput(f"{name} is {v}: it must be finite")
    return v


# --------------------------------------------------------------------------------------------
# Finalisation: one formula for every quantity, used by summarize and merge_partials alike


def _finalize(parts: Sequence[_Partial], kl_coef: float | None) -> StepSummary:
    seq_kl = np.concatenate([p.seq_kl for p in parts])
    n_seq = len(seq_kl)
    n_tok = sum(p.n_tokens for p in parts)
    if n_seq == 0 or n_tok == 0:
        raise InvalidInput("the partials hold no sequences: a step needs at least one")
    q05, q50, q95, q99 = _quantiles(seq_kl, _QUANTILES)
    rewards = _all_or_none([p.rewards for p in parts], "rewards")
    if kl_coef is None:
        coefs = {p.kl_coef for p in parts if p.kl_coef is not None}
        kl_coef = coefs.pop() if len(coefs) == 1 else None
    entropy = _all_or_none([p.sum_entropy for p in parts], "entropies")
    gap = _all_or_none([p.sum_rollout_gap for p in parts], "rollout_logprobs")
    return StepSummary(
        kl_mean=float(np.mean(seq_kl)),
        kl_std=float(np.std(seq_kl)),
        kl_min=float(seq_kl.min()),
        kl_p05=float(q05),
        kl_p50=float(q50),
        kl_p95=float(q95),
        kl_p99=float(q99),
        kl_max=float(seq_kl.max()),
        k1=sum(p.sum_l for p in parts) / n_tok,
        k2=sum(p.sum_half_l2 for p in parts) / n_tok,
        k3=max(0.0, sum(p.sum_k3 for p in parts) / n_tok),
        neg_kl_frac=float(np.count_nonzero(seq_kl < 0)) / n_seq,
        top1pct_share=_top_share(parts, n_tok),
        resp_len_mean=n_tok / n_seq,
        policy_nll=sum(p.sum_nll for p in parts) / n_tok,
        entropy_mean=None if entropy is None else sum(entropy) / n_tok,
        reward_mean=None if rewards is None else float(np.mean(np.concatenate(rewards))),
        reward_std=None if rewards is None else float(np.std(np.concatenate(rewards))),
        kl_coef=None if kl_coef is None else float(kl_coef),
        rollout_gap=None if gap is None else sum(gap) / n_tok,
        n_sequences=n_seq,
        n_tokens=n_tok,
        seq_kl=seq_kl,
        token_hist=np.sum([p.token_hist for p in parts], axis=0, dtype=np.int64),
    )


def _quantiles(x: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """np.quantile's default ('linear') method, without its per-call overhead (a tenth of a
    millisecond, as long as the whole token pass of a small step)."""
    s = np.sort(x)
    h = (len(s) - 1) * np.asarray(qs)
    lo = np.floor(h).astype(np.intp)
    hi = np.minimum(lo + 1, len(s) - 1)
    return s[lo] + (h - lo) * (s[hi] - s[lo])


def _all_or_none(values: list[Any], name: str) -> list[Any] | None:
    given = [v is not None for v in values]
    if all(given):
        return values
    if any(given):
        raise InvalidInput(f"{name} were given for some shards and not for others")
    return None


def _top_share(parts: Sequence[_Partial], n_tokens: int) -> float:
    """Share of the sum of positive l_t carried by the top ceil(1% n_tokens) tokens."""
    pos_sum = sum(p.sum_pos_l for p in parts)
    if pos_sum <= 0.0:
        return 0.0
    k = math.ceil(TOP_FRACTION * n_tokens)
    top = np.concatenate([p.top_pos_l for p in parts])
    if len(top) > k:
        top = np.partition(top, len(top) - k)[len(top) - k :]
    return min(1.0, float(np.sum(top, dtype=np.float64)) / pos_sum)


# --------------------------------------------------------------------------------------------
# Input normalisation and validation


@dataclass
class _Batch:
    """Inputs as (B, T) arrays of float32 or float64, a bool mask (None: all positions) and
    how to name a position in messages."""

    policy: np.ndarray
    ref: np.ndarray
    mask: np.ndarray | None
    rollout: np.ndarray | None
    entropies: np.ndarray | None
    rewards: np.ndarray | None
    n_tokens: int
    layout: str  # "2d", "1d" or "ragged"

    def where(self, name: str, i: int, j: int) -> str:
        if self.layout == "1d":
            return f"{name}[{j}]"
        if self.layout == "ragged":
            return f"{name}[{i}][{j}]"
        return f"{name}[{i}, {j}]"

    def token_arrays(self) -> list[tuple[str, np.ndarray, str]]:
        """(name, array, kind) of the per-token inputs, in the order they are validated."""
        out = [("policy_logprobs", self.policy, "logprob"), ("ref_logprobs", self.ref, "logprob")]
        if self.rollout is not None:
            out.append(("rollout_logprobs", self.rollout, "logprob"))
        if self.entropies is not None:
            out.append(("entropies", self.entropies, "entropy"))
        return out


def _prepare(
    policy: Any,
    ref: Any,
    mask: Any,
    *,
    rollout: Any = None,
    entropies: Any = None,
    rewards: Any = None,
) -> _Batch:
    """Validated (B, T) arrays of every per-token input (values are checked in the kernel)."""
    if isinstance(policy, list | tuple) and len(policy) == 0:
        raise InvalidInput("policy_logprobs is empty: a step needs at least one sequence")
    optional = ((rollout, "rollout_logprobs"), (entropies, "entropies"))
    if _is_sequence_list(policy):
        layout = "ragged"
        pol, refa, m, extras = _ragged_inputs(policy, ref, mask, optional)
    else:
        pol = _float_array(policy, "policy_logprobs")
        layout = "1d" if pol.ndim == 1 else "2d"
        pol, refa, m, extras = _dense_inputs(pol, ref, mask, optional, layout)
    if pol.shape[0] == 0:
        raise InvalidInput(
            f"policy_logprobs is empty (shape {pol.shape}): a step needs at least one sequence"
        )
    has_tokens = m.any(axis=1) if m is not None else np.full(pol.shape[0], pol.shape[1] > 0)
    empty = np.flatnonzero(~has_tokens)
    if len(empty):
        raise InvalidInput(
            f"sequence {empty[0]} has no response tokens under the mask: its KL would be "
            "'no data', not 0"
        )
    n_tokens = np.count_nonzero(m) if m is not None else pol.size
    if m is not None and n_tokens == m.size:
        m = None  # every position counts: skip the masking work
    return _Batch(
        policy=pol,
        ref=refa,
        mask=m,
        rollout=extras[0],
        entropies=extras[1],
        rewards=None if rewards is None else _rewards(rewards, pol.shape[0]),
        n_tokens=int(n_tokens),
        layout=layout,
    )


_Inputs = tuple[np.ndarray, np.ndarray, np.ndarray | None, list[np.ndarray | None]]


def _dense_inputs(
    policy: np.ndarray, ref: Any, mask: Any, optional: Sequence[tuple[Any, str]], layout: str
) -> _Inputs:
    pol = _as_2d(policy, "policy_logprobs")
    refa = _as_2d(_float_array(ref, "ref_logprobs"), "ref_logprobs")
    _same_shape(refa, pol, "ref_logprobs")
    m = None
    if mask is not None:
        mk = _as_2d(_to_numpy(mask, "mask"), "mask")
        m = _check_mask(_same_shape(mk, pol, "mask"), "mask", layout)
    extras = [
        None if x is None else _same_shape(_as_2d(_float_array(x, name), name), pol, name)
        for x, name in optional
    ]
    return pol, refa, m, extras


def _ragged_inputs(
    policy: Any, ref: Any, mask: Any, optional: Sequence[tuple[Any, str]]
) -> _Inputs:
    pol, m, lengths = _pad_ragged(policy, "policy_logprobs", None)
    if not _is_sequence_list(ref):
        raise InvalidInput(
            "ref_logprobs must be a list of sequences like policy_logprobs, "
            f"not {type(ref).__name__}"
        )
    refa, _, _ = _pad_ragged(ref, "ref_logprobs", lengths)
    if mask is not None:
        if not _is_sequence_list(mask):
            raise InvalidInput("mask must be None or a list of sequences like policy_logprobs")
        mk, _, _ = _pad_ragged(mask, "mask", lengths, is_mask=True)
        m = m & _check_mask(mk, "mask", "ragged")
    extras = [None if x is None else _pad_ragged(x, name, lengths)[0] for x, name in optional]
    return pol, refa, m, extras


def _is_sequence_list(x: Any) -> bool:
    """A list/tuple of sequences (ragged input); a flat list of numbers is one sequence."""
    return isinstance(x, list | tuple) and not all(isinstance(e, numbers.Real) for e in x)


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """An ndarray view of x: ndarrays, torch-like tensors (``.detach().cpu().numpy()``, with
    bfloat16 widened by ``.float()`` first since torch's ``.numpy()`` refuses it), anything
    with ``__array__``, nested lists."""
    if isinstance(x, np.ndarray):
        return x
    if callable(getattr(x, "detach", None)):
        t = x.detach()
        if "bfloat16" in str(getattr(t, "dtype", "")) and callable(getattr(t, "float", None)):
            t = t.float()
        if callable(getattr(t, "cpu", None)):
            t = t.cpu()
        if callable(getattr(t, "numpy", None)):
            return np.asarray(t.numpy())
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} could not be read as an array: {exc}") from None


def _float_array(x: Any, name: str) -> np.ndarray:
    """x as float32 (for 16/32-bit floats) or float64 (for float64 and integers)."""
    a = _to_numpy(x, name)
    dt = a.dtype
    if dt == np.float32 or dt == np.float64:
        return a
    if dt.kind == "f":
        return a.astype(np.float32 if dt.itemsize <= 4 else np.float64)
    if dt.kind in "iu":
        return a.astype(np.float64)
    if dt.name == "bfloat16":  # ml_dtypes / jax
        return a.astype(np.float32)
    raise InvalidInput(f"{name} has dtype {dt}: expected real numbers (a float or integer array)")


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 2:
        return a
    if a.ndim == 1:
        return a.reshape(1, -1)
    raise InvalidInput(
        f"{name} has shape {a.shape}: expected (batch, tokens), one 1-D sequence, or a list of "
        "1-D sequences"
    )


def _same_shape(a: np.ndarray, like: np.ndarray, name: str) -> np.ndarray:
    if a.shape != like.shape:
        raise InvalidInput(
            f"{name} has shape {a.shape} but policy_logprobs has shape {like.shape}: "
            "they must match"
        )
    return a


def _check_mask(m: np.ndarray, name: str, layout: str) -> np.ndarray:
    if m.dtype == np.bool_:
        return m
    if m.dtype.kind not in "iuf":
        raise InvalidInput(f"{name} has dtype {m.dtype}: expected booleans or 0/1 numbers")
    bad = (m != 0) & (m != 1)
    if bad.any():
        i, j = np.unravel_index(int(np.argmax(bad)), m.shape)
        where = {"1d": f"{name}[{j}]", "ragged": f"{name}[{i}][{j}]"}.get(
            layout, f"{name}[{i}, {j}]"
        )
        raise InvalidInput(f"{where} is {m[i, j]}: a mask holds booleans or 0/1")
    return m != 0


def _pad_ragged(
    seqs: Sequence[Any], name: str, lengths: np.ndarray | None, is_mask: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad a list of 1-D sequences to (B, T_max) with a validity mask."""
    arrays = []
    for i, s in enumerate(seqs):
        a = _to_numpy(s, f"{name}[{i}]") if is_mask else _float_array(s, f"{name}[{i}]")
        if a.ndim != 1:
            raise InvalidInput(f"{name}[{i}] has shape {a.shape}: each sequence must be 1-D")
        arrays.append(a)
    lens = np.array([len(a) for a in arrays], dtype=np.int64)
    if lengths is not None:
        if len(lens) != len(lengths):
            raise InvalidInput(
                f"{name} has {len(lens)} sequences but policy_logprobs has {len(lengths)}"
            )
        diff = np.flatnonzero(lens != lengths)
        if len(diff):
            i = diff[0]
            raise InvalidInput(
                f"{name}[{i}] has {lens[i]} tokens but policy_logprobs[{i}] has {lengths[i]}"
            )
    width = int(lens.max()) if len(lens) else 0
    dtype = np.result_type(*[a.dtype for a in arrays]) if arrays else np.float32
    out = np.zeros((len(arrays), width), dtype=dtype)
    valid = np.arange(width) < lens[:, None]
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, valid, lens


def _rewards(x: Any, n_seq: int) -> np.ndarray:
    r = _float_array(x, "rewards").astype(np.float64, copy=False)
    if r.shape != (n_seq,):
        raise InvalidInput(
            f"rewards has shape {r.shape} but the batch has {n_seq} sequences: "
            "pass one reward per sequence"
        )
    bad = np.flatnonzero(~np.isfinite(r))
    if len(bad):
        raise InvalidInput(f"rewards[{bad[0]}] is {r[bad[0]]}: rewards must be finite")
    return r


def _first_problem(batch: _Batch) -> InvalidInput | None:
    """The first bad token value, argument by argument, in row-major order (slow, exact)."""
    for name, a, kind in batch.token_arrays():
        for r0 in range(0, a.shape[0], 64):
            chunk = a[r0 : r0 + 64]
            m = None if batch.mask is None else batch.mask[r0 : r0 + 64]
            bad = ~np.isfinite(chunk)
            bad |= (
                (chunk < -LOGPROB_TOLERANCE) if kind == "entropy" else (chunk > LOGPROB_TOLERANCE)
            )
            if m is not None:
                bad &= m
            if bad.any():
                i, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
                v = float(chunk[i, j])
                return InvalidInput(_value_message(batch.where(name, r0 + int(i), int(j)), v, kind))
    return None


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:+.6g}"


def _value_message(where: str, v: float, kind: str) -> str:
    if not math.isfinite(v):
        return f"{where} is {_fmt(v)}: values under the mask must be finite"
    if kind == "entropy":
        return (
            f"{where} is {_fmt(v)}: an entropy must be >= 0 "
            f"(tolerance {LOGPROB_TOLERANCE:g} for fp16/bf16 rounding)"
        )
    return (
        f"{where} is {_fmt(v)}: a log-probability must be <= 0 "
        f"(tolerance {LOGPROB_TOLERANCE:g} for fp16/bf16 rounding)"
    )


# --------------------------------------------------------------------------------------------
# The numpy kernel (installs without monitor._kernel): whole-chunk passes on up to two threads
#
# Per token only cheap, branch-free passes run over every position: mask, subtract, compare,
# clip, multiply, sums and einsum dot products. Two families of tokens are then told apart:
#
# - central tokens, |l| < _TAIL_START (nearly all of them): their k3 terms come from power
#   sums. K(l) = exp(-l) - 1 + l = l^2 g(l) with g smooth, so sum_t K(l_t) = sum_n c_n M_(n+2)
#   where M_n = sum_t l_t^n and c_n are the coefficients of a polynomial close to g on the
#   central range (Chebyshev interpolation). No exp per token, and no loss of precision for
#   tiny l (where exp(-l) - 1 + l cancels). Their histogram bins come from three comparisons.
# - tail tokens, |l| >= _TAIL_START (a few percent): gathered into a small array where k3 is
#   exact, the histogram is a bincount and the top-1% candidates are found. The power sums
#   run over l clipped to +-_TAIL_START, so the tail's share of them is known exactly and is
#   taken back out.
#
# Gathering is the costly step (a data-dependent branch per position), which is why the tail
# starts at 0.5 nats rather than lower. Threads: every pass here releases the GIL (BLAS-backed
# gufuncs such as np.vecdot hold it, so they are avoided) and a chunk's passes are long (a
# quarter of a million positions); two threads still gain only about 1.3x, as each hand-back
# of the GIL waits for the other thread. Each thread owns its buffers and each chunk writes its
# own record, so results do not depend on scheduling.

_TAIL_START = 0.5
_CENTRAL_EDGES = (-0.25, 0.0, 0.25)  # inner edges of the central bins 38..41 = [-0.5, 0.5)
_CENTRAL_FIRST_BIN = _ZERO_BIN - 2

_CHUNK_POSITIONS = 1 << 18  # positions per chunk: long numpy passes, buffers in L2/L3
_PARALLEL_MIN_POSITIONS = 1 << 17  # below this a second thread costs more than it saves
_MAX_THREADS = 2
_CPUS = os.cpu_count() or 1
_BLOCK = 4096  # dot products in blocks, float64 across blocks


def _k3_coefficients(degree: int) -> np.ndarray:
    """Monomial coefficients c_0..c_degree of a polynomial close to g(l) = K(l) / l^2 on
    [-_TAIL_START, _TAIL_START]; g is evaluated through its Taylor series, exact here."""

    def g(x: np.ndarray) -> np.ndarray:
        lv = x * _TAIL_START
        return sum((-lv) ** n / math.factorial(n + 2) for n in range(30))

    cheb = np.polynomial.chebyshev.chebinterpolate(g, degree)
    return np.polynomial.chebyshev.cheb2poly(cheb) / _TAIL_START ** np.arange(degree + 1)


#: Degree per working dtype: relative error of g below 1e-6 for float32 (the precision of
#: a float32 difference of log-probs) and below 1e-12 for float64.
_K3_POLY = {
    np.dtype(np.float32): _k3_coefficients(4),
    np.dtype(np.float64): _k3_coefficients(8),
}


class _BadChunk(Exception):
    """A chunk holds a bad value under the mask; the caller locates the first one."""


@dataclass
class _KernelOut:
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


@dataclass
class _ChunkStats:
    """What one chunk contributes; sums are float64."""

    sum_nll: float
    sum_rollout_gap: float
    sum_entropy: float
    sum_pos_l: float
    moments: np.ndarray  # M_2..M_(degree+2) of l clipped to +-_TAIL_START
    n_tail_pos: int  # tail tokens, clipped to +_TAIL_START in the moments
    n_tail_neg: int  # and to -_TAIL_START
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

    def __init__(self, batch: _Batch, rows: int, full: bool, k_top: int) -> None:
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
                raise _BadChunk
            clean = [None if x is None else np.where(mask, x, 0) for x in arrays]
            stats = self._chunk(*clean, mask, seq_kl[r0:r1])
            if stats is False:
                raise _BadChunk
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
        np.greater_equal(np.abs(lt, out=x), _TAIL_START, out=flag)
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
        ls = np.clip(lt, -_TAIL_START, _TAIL_START, out=lt)
        degree = len(_K3_POLY[lt.dtype]) - 1
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
        hist[_ZERO_BIN] -= 0 if mask is None else mask.size - np.count_nonzero(mask)
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
    idx = np.floor(tail.astype(np.float64) * _BIN_SCALE) + _BIN_OFFSET
    return np.bincount(np.clip(idx, 0, _N_BINS - 1).astype(np.intp), minlength=_N_BINS)


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


_EXECUTOR: tuple[int, ThreadPoolExecutor] | None = None
_EXECUTOR_LOCK = threading.Lock()


def _helper_pool() -> ThreadPoolExecutor:
    """The helper threads, created on first use (again after a fork: threads do not survive
    one, and an executor inherited from the parent would wait forever)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR[0] != os.getpid():
            pool = ThreadPoolExecutor(_MAX_THREADS - 1, thread_name_prefix="klmon-divergence")
            _EXECUTOR = (os.getpid(), pool)
        return _EXECUTOR[1]


def _in_threads(n_tasks: int, n_positions: int, task: Callable[[int], None]) -> None:
    """task(0) .. task(n_tasks - 1) on up to _MAX_THREADS threads (this one included); the
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

    n_threads = min(_MAX_THREADS, n_tasks, _CPUS)
    if n_positions < _PARALLEL_MIN_POSITIONS:
        n_threads = 1
    helpers = [_helper_pool().submit(work) for _ in range(n_threads - 1)]
    try:
        work()
    finally:
        for h in helpers:
            h.result()


def _run_kernel(batch: _Batch, full: bool) -> _KernelOut:
    try:
        if _compiled is not None:
            return _run_compiled(batch, full)
        return _run_numpy(batch, full)
    except _BadChunk:
        problem = _first_problem(batch)
        if problem is None:  # only finite values, yet a sum overflowed
            problem = InvalidInput(
                "a sum over the batch overflows float64: the inputs hold finite values too "
                "large in magnitude (near 1e308) to summarise"
            )
        raise problem from None


def _run_numpy(batch: _Batch, full: bool) -> _KernelOut:
    b, t = batch.policy.shape
    rows = max(1, min(b, _CHUNK_POSITIONS // max(t, 1)))
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

    _in_threads(len(starts), batch.policy.size, task)
    if not full:
        return _KernelOut(
            batch.n_tokens, 0, 0, 0, 0, None, None, 0, np.empty(0), seq_kl, np.empty(0)
        )
    return _collect(batch, [s for s in stats if s is not None], seq_kl, k_top)


# --------------------------------------------------------------------------------------------
# The compiled kernel (monitor/_kernel.c): the same quantities in one fused pass per token


#: Whether the compiled kernel may use its AVX2 loop (where the CPU has AVX2 and FMA); the
#: scalar loop computes the same quantities. Tests switch it off to cover the scalar loop.
_SIMD = True


def _run_compiled(batch: _Batch, full: bool) -> _KernelOut:
    assert _compiled is not None
    given = [x for x in (batch.policy, batch.ref, batch.rollout, batch.entropies) if x is not None]
    dtype = np.result_type(*given)
    p, q, rollout, ent = (
        None if x is None else np.ascontiguousarray(x, dtype)
        for x in (batch.policy, batch.ref, batch.rollout, batch.entropies)
    )
    mask = None if batch.mask is None else np.ascontiguousarray(batch.mask)
    b, t = p.shape
    n_ranges = min(_MAX_THREADS, b) if p.size >= _PARALLEL_MIN_POSITIONS else 1
    bounds = [b * i // n_ranges for i in range(n_ranges + 1)]
    k_top = math.ceil(TOP_FRACTION * batch.n_tokens)
    seq_kl = np.empty(b)
    sums = np.zeros((n_ranges, _compiled.N_SUMS))
    hist = np.zeros((n_ranges, _N_BINS), np.int64)
    coef = _K3_POLY[np.dtype(np.float64)]
    is_double = dtype == np.float64
    # the tolerance as the inputs' dtype holds it, as the numpy kernel and the messages compare
    tol = LOGPROB_TOLERANCE if is_double else float(np.float32(LOGPROB_TOLERANCE))

    def rows(x: np.ndarray | None, i: int) -> np.ndarray | None:
        return None if x is None else x[bounds[i] : bounds[i + 1]]

    cap = [max(k_top, (bounds[i + 1] - bounds[i]) * t // 16) for i in range(n_ranges)]
    cands: list[np.ndarray] = [np.empty(c) for c in cap]
    n_cands = [0] * n_ranges

    def task(i: int) -> None:
        status, _, n_cands[i], _ = _compiled.stats(
            *(rows(x, i) for x in (p, q, mask, rollout, ent)),
            *(bounds[i + 1] - bounds[i], t, is_double, tol, _SIMD),
            *(coef, seq_kl[bounds[i] : bounds[i + 1]], sums[i], hist[i], cands[i]),
        )
        if status:
            raise _BadChunk

    _in_threads(n_ranges, p.size, task)
    if not full:
        return _KernelOut(
            batch.n_tokens, 0, 0, 0, 0, None, None, 0, np.empty(0), seq_kl, np.empty(0)
        )
    total = sums.sum(axis=0)
    token_hist = hist.sum(axis=0)
    if k_top <= sum(n_cands) and all(n <= c for n, c in zip(n_cands, cap, strict=True)):
        top = np.concatenate([c[:n] for c, n in zip(cands, n_cands, strict=True)])
    elif total[4] == 0:  # no positive l at all (the first steps: policy == reference)
        top = np.empty(0)
    else:  # too few positive tail values, or too many to keep: gather above a sampled level
        lo = _sampled_level(p, q, mask, k_top, batch.n_tokens)
        top = _gather_positive(p, q, mask, bounds, is_double, lo)
        if len(top) < k_top and lo > 0:
            top = _gather_positive(p, q, mask, bounds, is_double, 0.0)
    if len(top) > k_top:
        top = np.partition(top, len(top) - k_top)[len(top) - k_top :]
    return _KernelOut(
        n_tokens=batch.n_tokens,
        sum_l=float(total[1]),
        sum_half_l2=float(total[2]),
        sum_k3=max(0.0, float(total[3])),
        sum_nll=float(total[0]),
        sum_rollout_gap=float(total[5]) if rollout is not None else None,
        sum_entropy=float(total[6]) if ent is not None else None,
        sum_pos_l=float(total[4]),
        top_pos_l=top,
        seq_kl=seq_kl,
        token_hist=token_hist,
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
    assert _compiled is not None
    t = p.shape[1]
    found: list[np.ndarray] = [np.empty(0)] * (len(bounds) - 1)

    def task(i: int) -> None:
        sl = slice(bounds[i], bounds[i + 1])
        args = (p[sl], q[sl], None if mask is None else mask[sl], sl.stop - sl.start, t)
        out = np.empty(max(1024, (sl.stop - sl.start) * t // 16))
        n = _compiled.collect(*args, is_double, lo, out)
        if n > len(out):  # more than room for: gather again into an exact fit
            out = np.empty(n)
            n = _compiled.collect(*args, is_double, lo, out)
        found[i] = out[:n]

    _in_threads(len(bounds) - 1, p.size, task)
    return np.concatenate(found)


def _collect(
    batch: _Batch, chunks: list[_ChunkStats], seq_kl: np.ndarray, k_top: int
) -> _KernelOut:
    top = np.concatenate([c.top for c in chunks])
    if len(top) > k_top:
        top = np.partition(top, len(top) - k_top)[len(top) - k_top :]
    moments = np.sum([c.moments for c in chunks], axis=0)
    # the tail tokens sit at exactly +-_TAIL_START in the power sums: take them out
    powers = np.arange(2, len(moments) + 2)
    n_pos = sum(c.n_tail_pos for c in chunks)
    n_neg = sum(c.n_tail_neg for c in chunks)
    moments -= n_pos * _TAIL_START**powers + n_neg * (-_TAIL_START) ** powers
    coef = _K3_POLY[np.result_type(batch.policy.dtype, batch.ref.dtype)]

    def total(name: str) -> float:
        return sum(getattr(c, name) for c in chunks)

    return _KernelOut(
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
