"""The per-step KL quantities of DESIGN.md, computed from per-token log-probabilities (numpy only).

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

Speed: one pass over the batch in row chunks with preallocated buffers, float32 arithmetic
per token (float64 for float64 input) and float64 accumulation of every sum. One thread: two
threads measured slower on a shared 2-core machine (GIL hand-offs between many short numpy
calls). See ``benchmarks/bench_divergence.py``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.errors import InvalidInput

__all__ = [
    "HIST_EDGES",
    "LOGPROB_TOLERANCE",
    "StepSummary",
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
    """The KL quantities of one step (DESIGN.md). Scalars are floats, or None when their
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
    q05, q50, q95, q99 = np.quantile(seq_kl, _QUANTILES)
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
# The kernel: one pass over row chunks


# k3 per token is K(l) = exp(-l) - 1 + l. numpy's float64 expm1/exp are scalar libm calls
# (5-10 ns per token on this machine), so for |l| < 1/2 -- nearly every token -- K is taken
# from its Taylor series sum_{n=2..8} (-l)^n / n!, summed over tokens through the power sums
# M_n = sum_t l_t^n (dot products, float64). On |l| <= 1/2 + 1e-6 the truncation error is
# below 5e-8 relative (float32 grade) and each token's polynomial is > 0, like K. Tokens
# with |l| >= 1/2 (found through their histogram bin) use expm1(-l) + l exactly, which is
# >= 0 because expm1 is faithfully rounded and -l is representable.
_SERIES_BINS = (_ZERO_BIN - 2, _ZERO_BIN + 1)  # bins 38..41 hold -0.5 <= l < 0.5
_SERIES_MAX_POWER = 4  # powers l..l^4 give M_2..M_8 as <l^i, l^i> and <l^i, l^(i+1)>
_SERIES_EVEN = np.array([1 / math.factorial(2 * i) for i in range(1, _SERIES_MAX_POWER + 1)])
_SERIES_ODD = np.array([-1 / math.factorial(2 * i + 1) for i in range(1, _SERIES_MAX_POWER)])

_DOT_BLOCK = 4096
_POWERS_BLOCK = 16384  # 4 float64 powers of this many tokens: 512 kB, half the L2
_CHUNK_POSITIONS = 65536  # rows per chunk: fewer numpy calls vs buffers that stay in cache


def _einsum_vecdot(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b, out=out)


_vecdot = getattr(np, "vecdot", _einsum_vecdot)  # numpy < 2.0 has no vecdot


def _le(a: np.ndarray, bound: float) -> bool:
    """max(a) <= bound; False when a holds NaN."""
    return bool(a.max() <= bound)


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


class _Shard:
    """Outputs of the pass: per-row sums (each row written by one chunk only) and per-chunk
    scalars, added up at the end, so a chunk can be recomputed without double counting."""

    def __init__(self, batch: _Batch, rows_per_chunk: int, full: bool) -> None:
        b, t = batch.policy.shape
        self.batch = batch
        self.full = full
        self.rows = rows_per_chunk
        self.n_chunks = -(-b // rows_per_chunk)
        self.wdtype = (
            np.float64 if np.float64 in (batch.policy.dtype, batch.ref.dtype) else np.float32
        )
        self.seq_kl = np.empty(b)
        self.k_top = math.ceil(TOP_FRACTION * batch.n_tokens)
        if full:
            n_extra = (batch.entropies is not None) + (batch.rollout is not None)
            self.row_sums = np.zeros((2 + n_extra, b))  # nll, positive l, then extras
            # M2, M4, M6, M8 then M3, M5, M7 per chunk
            self.moments = np.zeros((2 * _SERIES_MAX_POWER - 1, self.n_chunks))
            self.big = np.zeros((self.n_chunks, 2))  # exact k3 and l^2 of |l| >= 1/2 tokens
            # bin index of every position, counted at the end as byte pairs (uint16)
            self.bins = np.full(b * t + (b * t) % 2, _ZERO_BIN, dtype=np.uint8)


class _Worker:
    """Preallocated chunk buffers, the per-chunk arithmetic and the running top-1% candidates."""

    def __init__(self, shard: _Shard) -> None:
        r, t = shard.rows, shard.batch.policy.shape[1]
        wd = shard.wdtype
        self.shard = shard
        self.lw = np.empty((r, t), wd)
        self.xw = np.empty((r, t), wd)
        self.mw = np.empty((r, t), wd)
        self.pm = np.empty((r, t), wd)
        self.flag = np.empty((r, t), np.bool_)
        self.u8 = np.empty(r * t, np.uint8)
        if shard.full:
            n_blocks = -(-min(r * t, _POWERS_BLOCK) // _DOT_BLOCK)
            self.powers = np.empty((_SERIES_MAX_POWER, n_blocks * _DOT_BLOCK))  # float64
            self.dots = np.empty((2 * _SERIES_MAX_POWER - 1, n_blocks))
        self.tau = 0.0  # candidates must exceed this (a lower bound of the final threshold)
        self.pool: list[np.ndarray] = []
        self.pool_size = 0

    # -- one chunk -------------------------------------------------------------------------

    def run(self, c: int) -> None:
        shard = self.shard
        r0 = c * shard.rows
        r1 = min(r0 + shard.rows, shard.batch.policy.shape[0])
        b = shard.batch
        arrays = [
            x[r0:r1] if x is not None else None for x in (b.policy, b.ref, b.rollout, b.entropies)
        ]
        mask = None if b.mask is None else b.mask[r0:r1]
        if not self._chunk(c, r0, r1, *arrays, mask):
            # Fast checks failed: masked positions may hold garbage (NaN, +1 padding), or a real
            # problem sits under the mask. Zero the masked positions and look again.
            if mask is None:
                raise _BadChunk
            clean = [None if x is None else np.where(mask, x, 0) for x in arrays]
            if not self._chunk(c, r0, r1, *clean, mask):
                raise _BadChunk

    def _chunk(
        self,
        c: int,
        r0: int,
        r1: int,
        p: np.ndarray,
        q: np.ndarray,
        rollout: np.ndarray | None,
        ent: np.ndarray | None,
        mask: np.ndarray | None,
    ) -> bool:
        """Statistics of rows r0:r1; False (and nothing recorded) when a fast check fails."""
        shard = self.shard
        nr = r1 - r0
        lw, xw, mw = self.lw[:nr], self.xw[:nr], self.mw[:nr]
        if mask is not None:
            np.copyto(mw, mask)
        # Mask before subtracting. Multiplying by the 0/1 mask zeroes finite padding (TRL's
        # +1.0 included); NaN/inf padding turns into NaN, fails the checks, and the caller
        # retries the chunk with the padding replaced by np.where.
        pm = self._masked(p, mask, mw, self.pm[:nr])
        qm = self._masked(q, mask, mw, xw)
        np.subtract(pm, qm, out=lw)
        kl = np.add.reduce(lw, axis=1, dtype=np.float64, out=shard.seq_kl[r0:r1])
        if not (
            np.isfinite(kl).all() and _le(pm, LOGPROB_TOLERANCE) and _le(qm, LOGPROB_TOLERANCE)
        ):
            return False
        if not shard.full:
            return True
        sums = shard.row_sums[:, r0:r1]
        if not np.isfinite(np.add.reduce(pm, axis=1, dtype=np.float64, out=sums[0])).all():
            return False
        if not self._optional_sums(sums[2:], rollout, ent, mask, pm):
            return False
        # everything below only records: the chunk is valid
        self._histogram(r0, r1, lw, xw)
        np.maximum(lw, 0, out=xw)
        np.add.reduce(xw, axis=1, dtype=np.float64, out=sums[1])
        self._top_candidates(xw)
        self._k2_k3(c, r0, r1, lw)
        return True

    def _optional_sums(
        self,
        sums: np.ndarray,
        rollout: np.ndarray | None,
        ent: np.ndarray | None,
        mask: np.ndarray | None,
        pm: np.ndarray,
    ) -> bool:
        """Per-row sums of the rollout gap and the entropies, when given; False when a value
        is out of range."""
        xw, mw = self.xw[: len(pm)], self.mw[: len(pm)]
        i = 0
        if rollout is not None:
            rm = self._masked(rollout, mask, mw, xw)
            if not _le(rm, LOGPROB_TOLERANCE):
                return False
            np.subtract(rm, pm, out=xw)
            if not np.isfinite(np.add.reduce(xw, axis=1, dtype=np.float64, out=sums[i])).all():
                return False
            i += 1
        if ent is not None:
            em = self._masked(ent, mask, mw, xw)
            if not em.min() >= -LOGPROB_TOLERANCE:  # NaN fails too
                return False
            if not np.isfinite(np.add.reduce(em, axis=1, dtype=np.float64, out=sums[i])).all():
                return False
        return True

    @staticmethod
    def _masked(
        x: np.ndarray, mask: np.ndarray | None, mw: np.ndarray, out: np.ndarray
    ) -> np.ndarray:
        if mask is None:
            return x
        # inf * 0 under the mask is NaN here; the caller detects it and takes the slow path.
        with np.errstate(invalid="ignore"):
            return np.multiply(x, mw, out=out)

    def _histogram(self, r0: int, r1: int, lw: np.ndarray, xw: np.ndarray) -> None:
        np.multiply(lw, _BIN_SCALE, out=xw)
        np.add(xw, _BIN_OFFSET, out=xw)
        np.clip(xw, 0, _N_BINS - 0.5, out=xw)  # beyond the ends: first/last bin
        t = lw.shape[1]
        np.copyto(self.shard.bins[r0 * t : r1 * t].reshape(lw.shape), xw, casting="unsafe")

    def _top_candidates(self, pos: np.ndarray) -> None:
        """Keep every positive l above tau; when the pool grows, cut it to the k largest and
        raise tau to the k-th largest (it can only rise as more tokens are seen)."""
        flag = self.flag[: len(pos)]
        np.greater(pos, self.tau, out=flag)
        cand = pos[flag]
        if len(cand):
            self.pool.append(cand)
            self.pool_size += len(cand)
            k = self.shard.k_top
            if self.pool_size > max(2 * k, 4096):
                self._shrink_pool(k)

    def _shrink_pool(self, k: int) -> None:
        allv = np.concatenate(self.pool)
        if len(allv) > k:
            allv = np.partition(allv, len(allv) - k)[len(allv) - k :]
            self.tau = float(allv[0])  # the k-th largest so far
        self.pool = [allv]
        self.pool_size = len(allv)

    def _k2_k3(self, c: int, r0: int, r1: int, lw: np.ndarray) -> None:
        """k2 and k3 sums of the chunk (lw is clobbered: it is the chunk's last use)."""
        shard = self.shard
        n = lw.size
        flat = lw.reshape(-1)
        # tokens outside the series range: exact expm1, then zeroed for the power sums
        u8 = self.u8[:n]
        t = lw.shape[1]
        np.subtract(shard.bins[r0 * t : r1 * t], _SERIES_BINS[0], out=u8)  # wraps below 38
        flag = self.flag.reshape(-1)[:n]
        np.greater(u8, _SERIES_BINS[1] - _SERIES_BINS[0], out=flag)
        big = np.flatnonzero(flag)
        if len(big):
            lb = flat[big].astype(np.float64)
            flat[big] = 0
            shard.big[c, 0] = float(np.sum(np.expm1(-lb) + lb))
            shard.big[c, 1] = float(np.dot(lb, lb))
        # power sums in float64, a sub-block at a time so the powers stay in L2
        moments = shard.moments[:, c]
        moments[:] = 0.0
        for s0 in range(0, n, _POWERS_BLOCK):
            moments += self._power_sums(flat[s0 : s0 + _POWERS_BLOCK])

    def _power_sums(self, x: np.ndarray) -> np.ndarray:
        """[M2, M4, M6, M8, M3, M5, M7] of x as float64 dot products over blocks short enough
        that BLAS stays on this thread (OpenBLAS threads ddot above ~10k elements)."""
        n = len(x)
        n_blocks = -(-n // _DOT_BLOCK)
        pw = self.powers[:, : n_blocks * _DOT_BLOCK]  # l, l^2, l^3, l^4 with a zero tail
        np.copyto(pw[0, :n], x)
        pw[0, n:] = 0.0
        np.multiply(pw[0], pw[0], out=pw[1])
        np.multiply(pw[1], pw[0], out=pw[2])
        np.multiply(pw[1], pw[1], out=pw[3])
        blocks = pw.reshape(_SERIES_MAX_POWER, n_blocks, _DOT_BLOCK)
        dots = self.dots[:, :n_blocks]
        _vecdot(blocks, blocks, out=dots[:_SERIES_MAX_POWER])
        _vecdot(blocks[:-1], blocks[1:], out=dots[_SERIES_MAX_POWER:])
        return np.add.reduce(dots, axis=1)

    # -- end of shard ----------------------------------------------------------------------

    def top_values(self) -> np.ndarray:
        return np.concatenate(self.pool) if self.pool else np.empty(0)


def _run_kernel(batch: _Batch, full: bool) -> _KernelOut:
    t = batch.policy.shape[1]
    rows = max(1, _CHUNK_POSITIONS // max(t, 1))
    shard = _Shard(batch, rows, full)
    worker = _Worker(shard)
    try:
        for c in range(shard.n_chunks):
            worker.run(c)
    except _BadChunk:
        problem = _first_problem(batch)
        if problem is None:  # only finite values, yet a sum overflowed
            problem = InvalidInput(
                "policy_logprobs - ref_logprobs overflows float64 when summed over a sequence"
            )
        raise problem from None
    seq_kl = shard.seq_kl
    if not full:
        return _KernelOut(
            batch.n_tokens, 0, 0, 0, 0, None, None, 0, np.empty(0), seq_kl, np.empty(0)
        )
    return _collect(shard, worker)


def _collect(shard: _Shard, worker: _Worker) -> _KernelOut:
    batch = shard.batch
    sums = shard.row_sums.sum(axis=1)
    extra = iter(sums[2:])
    big = shard.big.sum(axis=0)
    moments = shard.moments.sum(axis=1)
    even, odd = moments[:_SERIES_MAX_POWER], moments[_SERIES_MAX_POWER:]
    series = float(even @ _SERIES_EVEN + odd @ _SERIES_ODD)
    top = worker.top_values()
    if len(top) > shard.k_top:
        top = np.partition(top, len(top) - shard.k_top)[len(top) - shard.k_top :]
    return _KernelOut(
        n_tokens=batch.n_tokens,
        sum_l=float(np.sum(shard.seq_kl)),
        sum_half_l2=0.5 * float(even[0] + big[1]),
        sum_k3=max(0.0, series) + float(big[0]),
        sum_nll=-float(sums[0]),
        sum_rollout_gap=float(next(extra)) if batch.rollout is not None else None,
        sum_entropy=float(next(extra)) if batch.entropies is not None else None,
        sum_pos_l=float(sums[1]),
        top_pos_l=top.astype(np.float64),
        seq_kl=shard.seq_kl,
        token_hist=_count_bins(shard.bins, batch),
    )


def _count_bins(bins: np.ndarray, batch: _Batch) -> np.ndarray:
    """Histogram of the bin indices, counted as byte pairs: one bincount over half as many
    uint16 values (both bytes of a pair are added back, so byte order does not matter)."""
    pairs = np.bincount(bins.view(np.uint16), minlength=1 << 16).reshape(256, 256)
    counts = pairs.sum(axis=0) + pairs.sum(axis=1)
    hist = counts[:_N_BINS].astype(np.int64)
    # masked positions (l = 0) and the odd-length pad byte were counted in the zero bin
    hist[_ZERO_BIN] -= len(bins) - batch.n_tokens
    return hist
