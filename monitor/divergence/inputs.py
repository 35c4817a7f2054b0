"""The one validator of log-prob batches, shared by :mod:`monitor.divergence` and the live
client (``monitor.ingest.client``), so both read the same input the same way:

- ragged: a list or tuple whose items are not all numbers is a list of 1-D sequences
  (:func:`is_sequence_list`), right-padded to (B, T_max) with a validity mask; a flat list of
  numbers is one sequence. Every per-token argument then is such a list, of the same lengths.
- dtypes (:func:`working_dtype`): floats of 32 bits or fewer (float16, bfloat16 from torch,
  ml_dtypes or jax) are read as float32, float64 and integers as float64; anything else is
  refused. The client copies float arrays as they are and widens the rest at the call.
- masks (:func:`check_mask`): booleans, or numbers that are 0 or 1.
- values (:func:`check_values`, :func:`first_problem`): finite under the mask, log-probs
  <= :data:`LOGPROB_TOLERANCE`, entropies >= -:data:`LOGPROB_TOLERANCE`.

Messages name the argument, the problem and the first offending position in row-major
order, written as the caller wrote the input (:func:`position`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from monitor.divergence._constants import LOGPROB_TOLERANCE
from monitor.errors import InvalidInput

#: How the caller laid a batch out: one (B, T) array, one 1-D sequence, or a list of sequences.
Layout = Literal["2d", "1d", "ragged"]


def position(name: str, i: int, j: int, layout: Layout) -> str:
    """Token j of sequence i of argument ``name``, written as the caller indexes its input."""
    if layout == "1d":
        return f"{name}[{j}]"
    if layout == "ragged":
        return f"{name}[{i}][{j}]"
    return f"{name}[{i}, {j}]"


@dataclass
class Batch:
    """Inputs as (B, T) arrays of float32 or float64, a bool mask (None: all positions) and
    how to name a position in messages."""

    policy: np.ndarray
    ref: np.ndarray
    mask: np.ndarray | None
    rollout: np.ndarray | None
    entropies: np.ndarray | None
    rewards: np.ndarray | None
    layout: Layout

    @cached_property
    def n_tokens(self) -> int:
        """Positions under the mask, counted on first use (the compiled pass counts them as it
        reads, and does not ask)."""
        return int(np.count_nonzero(self.mask)) if self.mask is not None else self.policy.size

    def token_arrays(self) -> list[tuple[str, np.ndarray, Kind]]:
        """(name, array, kind) of the per-token inputs, in the order they are validated."""
        out: list[tuple[str, np.ndarray, Kind]] = [
            ("policy_logprobs", self.policy, "logprob"),
            ("ref_logprobs", self.ref, "logprob"),
        ]
        if self.rollout is not None:
            out.append(("rollout_logprobs", self.rollout, "logprob"))
        if self.entropies is not None:
            out.append(("entropies", self.entropies, "entropy"))
        return out


def prepare(
    policy: Any,
    ref: Any,
    mask: Any,
    *,
    rollout: Any = None,
    entropies: Any = None,
    rewards: Any = None,
) -> Batch:
    """Validated (B, T) arrays of every per-token input (values are checked in the kernel)."""
    if isinstance(policy, list | tuple) and len(policy) == 0:
        raise InvalidInput("policy_logprobs is empty: a step needs at least one sequence")
    optional = ((rollout, "rollout_logprobs"), (entropies, "entropies"))
    if is_sequence_list(policy):
        layout = "ragged"
        pol, refa, m, extras = ragged_inputs(policy, ref, mask, optional)
    else:
        pol = float_array(policy, "policy_logprobs")
        layout = "1d" if pol.ndim == 1 else "2d"
        pol, refa, m, extras = _dense_inputs(pol, ref, mask, optional, layout)
    if pol.shape[0] == 0:
        raise InvalidInput(
            f"policy_logprobs is empty (shape {pol.shape}): a step needs at least one sequence"
        )
    has_tokens = m.any(axis=1) if m is not None else np.full(pol.shape[0], pol.shape[1] > 0)
    if not has_tokens.all():
        raise InvalidInput(
            f"sequence {np.flatnonzero(~has_tokens)[0]} has no response tokens under the "
            "mask: its KL would be 'no data', not 0"
        )
    return Batch(
        policy=pol,
        ref=refa,
        mask=m,
        rollout=extras[0],
        entropies=extras[1],
        rewards=None if rewards is None else check_rewards(rewards, pol.shape[0]),
        layout=layout,
    )


#: policy, ref, mask (None: every position), then the optional per-token arrays in order.
Inputs = tuple[np.ndarray, np.ndarray, np.ndarray | None, list[np.ndarray | None]]


def _dense_inputs(
    policy: np.ndarray, ref: Any, mask: Any, optional: Sequence[tuple[Any, str]], layout: str
) -> Inputs:
    pol = as_2d(policy, "policy_logprobs")
    refa = as_2d(float_array(ref, "ref_logprobs"), "ref_logprobs")
    same_shape(refa, pol, "ref_logprobs")
    m = None
    if mask is not None:
        mk = as_2d(to_numpy(mask, "mask"), "mask")
        m = check_mask(same_shape(mk, pol, "mask"), "mask", layout)
    extras = [
        None if x is None else same_shape(as_2d(float_array(x, name), name), pol, name)
        for x, name in optional
    ]
    return pol, refa, m, extras


def ragged_inputs(
    policy: Any,
    ref: Any,
    mask: Any,
    optional: Sequence[tuple[Any, str]] = (),
    check_shape: Callable[[tuple[int, int], str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray | None]]:
    """Padded (B, T_max) arrays of lists of sequences: policy, ref, the validity mask (and the
    caller's mask), and each ``(value, name)`` of ``optional`` (None stays None).
    ``check_shape(shape, name)`` may refuse the padded shape before anything is allocated."""
    pol, m, lengths = pad_ragged(policy, "policy_logprobs", None, check_shape=check_shape)
    if not is_sequence_list(ref):
        raise InvalidInput(
            "ref_logprobs must be a list of sequences like policy_logprobs, "
            f"not {type(ref).__name__}"
        )
    refa, _, _ = pad_ragged(ref, "ref_logprobs", lengths)
    if mask is not None:
        if not is_sequence_list(mask):
            raise InvalidInput("mask must be None or a list of sequences like policy_logprobs")
        mk, _, _ = pad_ragged(mask, "mask", lengths, is_mask=True)
        m = m & check_mask(mk, "mask", "ragged")
    extras = [None if x is None else pad_ragged(x, name, lengths)[0] for x, name in optional]
    return pol, refa, m, extras


def is_sequence_list(x: Any) -> bool:
    """A list/tuple of sequences (ragged input); a flat list of numbers is one sequence."""
    return isinstance(x, list | tuple) and not all(isinstance(e, numbers.Real) for e in x)


def to_numpy(x: Any, name: str) -> np.ndarray:
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
            try:
                return np.asarray(t.numpy())
            except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16 unannounced)
                return np.asarray(t.float().numpy())
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} could not be read as an array: {exc}") from None


def working_dtype(dt: np.dtype, name: str) -> np.dtype:
    """The dtype the statistics are computed in for an input of dtype ``dt``: float32 for
    floats of 32 bits or fewer (bfloat16 included: its values are a float32's top half),
    float64 for float64 and integers. InvalidInput for anything else (strings, booleans...)."""
    if dt.kind == "f":
        return np.dtype(np.float32 if dt.itemsize <= 4 else np.float64)
    if dt.kind in "iu":
        return np.dtype(np.float64)
    if dt.name == "bfloat16":  # ml_dtypes / jax
        return np.dtype(np.float32)
    raise InvalidInput(f"{name} has dtype {dt}: expected real numbers (a float or integer array)")


def float_array(x: Any, name: str) -> np.ndarray:
    """x in its :func:`working_dtype` (no copy when it already is)."""
    a = to_numpy(x, name)
    return a.astype(working_dtype(a.dtype, name), copy=False)


def as_2d(a: Any, name: str) -> Any:
    """A (B, T) array, or one 1-D sequence as a batch of one (any array with ``ndim`` and
    ``reshape``: the client's deferred copies too)."""
    if a.ndim == 2:
        return a
    if a.ndim == 1:
        return a.reshape(1, -1)
    raise InvalidInput(
        f"{name} has shape {a.shape}: expected (batch, tokens), one 1-D sequence, or a list of "
        "1-D sequences"
    )


def same_shape(a: Any, like: Any, name: str) -> Any:
    """a, when its shape is policy_logprobs' (``like``)."""
    if a.shape != like.shape:
        raise InvalidInput(
            f"{name} has shape {a.shape} but policy_logprobs has shape {like.shape}: "
            "they must match"
        )
    return a


def check_mask(m: np.ndarray, name: str, layout: Layout) -> np.ndarray:
    """A 2-D mask as booleans: booleans as they are, numbers that are all 0 or 1 compared."""
    if m.dtype == np.bool_:
        return m
    if m.dtype.kind not in "iuf":
        raise InvalidInput(f"{name} has dtype {m.dtype}: expected booleans or 0/1 numbers")
    bad = (m != 0) & (m != 1)
    if bad.any():
        i, j = np.unravel_index(int(np.argmax(bad)), m.shape)
        where = position(name, int(i), int(j), layout)
        raise InvalidInput(f"{where} is {m[i, j]}: a mask holds booleans or 0/1")
    return m != 0


def pad_ragged(
    seqs: Sequence[Any],
    name: str,
    lengths: np.ndarray | None,
    is_mask: bool = False,
    check_shape: Callable[[tuple[int, int], str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad a list of 1-D sequences to (B, T_max) with a validity mask; ``lengths``: the
    lengths they must have (policy_logprobs'), None for policy_logprobs itself."""
    arrays = []
    for i, s in enumerate(seqs):
        a = to_numpy(s, f"{name}[{i}]") if is_mask else float_array(s, f"{name}[{i}]")
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
                f"{name}[{i}] has {lens[i]} tokens but policy_logprobs[{i}] has {lengths[i]}: "
                "a sequence has the same length in every argument"
            )
    width = int(lens.max()) if len(lens) else 0
    if check_shape is not None:
        check_shape((len(arrays), width), name)
    dtype = np.result_type(*[a.dtype for a in arrays]) if arrays else np.float32
    out = np.zeros((len(arrays), width), dtype=dtype)
    valid = np.arange(width) < lens[:, None]
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, valid, lens


def check_rewards(x: Any, n_seq: int) -> np.ndarray:
    """One finite float64 reward per sequence."""
    r = float_array(x, "rewards").astype(np.float64, copy=False)
    if r.shape != (n_seq,):
        raise InvalidInput(
            f"rewards has shape {r.shape} but the batch has {n_seq} sequences: "
            "pass one reward per sequence"
        )
    finite = np.isfinite(r)
    if not finite.all():
        i = np.flatnonzero(~finite)[0]
        raise InvalidInput(f"rewards[{i}] is {r[i]}: rewards must be finite")
    return r


#: What a per-token array holds: log-probabilities (<= 0) or entropies (>= 0).
Kind = Literal["logprob", "entropy"]


def first_problem(batch: Batch) -> InvalidInput | None:
    """The first bad token value, argument by argument, in row-major order (slow, exact)."""
    for name, a, kind in batch.token_arrays():
        problem = first_bad_value(a, name, batch.mask, kind, batch.layout)
        if problem is not None:
            return problem
    return None


def first_bad_value(
    a: np.ndarray, name: str, mask: np.ndarray | None, kind: Kind, layout: Layout
) -> InvalidInput | None:
    """The error for the first out-of-range value of the 2-D array ``a`` under ``mask``, in
    row-major order (64 rows at a time: bounded memory), or None."""
    for r0 in range(0, a.shape[0], 64):
        chunk = a[r0 : r0 + 64]
        bad = ~np.isfinite(chunk)
        bad |= (chunk < -LOGPROB_TOLERANCE) if kind == "entropy" else (chunk > LOGPROB_TOLERANCE)
        if mask is not None:
            bad &= mask[r0 : r0 + 64]
        if bad.any():
            i, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
            where = position(name, r0 + int(i), int(j), layout)
            return InvalidInput(value_message(where, float(chunk[i, j]), kind))
    return None


def check_values(
    a: np.ndarray, name: str, mask: np.ndarray | None, kind: Kind, layout: Layout
) -> None:
    """InvalidInput naming the first out-of-range value of ``a`` under ``mask``. One pass each
    for the minimum and the maximum when every value is fine (the common case), mask unread;
    padding outside the mask may hold anything."""
    lo, hi = a.min(), a.max()
    if kind == "entropy":
        if lo >= -LOGPROB_TOLERANCE and np.isfinite(hi):
            return
    elif hi <= LOGPROB_TOLERANCE and np.isfinite(lo):
        return
    problem = first_bad_value(a, name, mask, kind, layout)
    if problem is not None:
        raise problem


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:+.6g}"


def value_message(where: str, v: float, kind: Kind) -> str:
    """Why the value v at ``where`` is refused (the one wording of value errors)."""
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


def check_scalar(x: Any, name: str) -> float:
    """x as a finite float (kl_coef)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} is {x!r}: expected a number") from None
    if not math.isfinite(v):
        raise InvalidInput(f"{name} is {v}: it must be finite")
    return v


def check_token_ids(
    token_ids: Any, shape: tuple[int, ...], layout: Layout, mask: np.ndarray | None = None
) -> np.ndarray:
    """``token_ids`` as a (B, T) int64 array of the log-probs' ``shape``: integers (any
    integer dtype; floats are refused, ids are never floats), non-negative under ``mask``
    (None: everywhere). Outside the mask anything goes (labels padded with -100): those
    positions read 0. A list of 1-D sequences is padded like the log-probs."""
    name = "token_ids"
    if is_sequence_list(token_ids):
        seqs = [to_numpy(s, f"{name}[{i}]") for i, s in enumerate(token_ids)]
        for i, s in enumerate(seqs):
            if s.ndim != 1:
                raise InvalidInput(f"{name}[{i}] has shape {s.shape}: each sequence must be 1-D")
            _int_dtype(s, f"{name}[{i}]")
        if len(seqs) != shape[0]:
            raise InvalidInput(
                f"{name} has {len(seqs)} sequences but policy_logprobs has {shape[0]}"
            )
        a = np.zeros(shape, dtype=np.int64)
        for i, s in enumerate(seqs):
            if len(s) > shape[1]:
                raise InvalidInput(
                    f"{name}[{i}] has {len(s)} tokens but policy_logprobs[{i}] has fewer"
                )
            a[i, : len(s)] = s
    else:
        a = to_numpy(token_ids, name)
        _int_dtype(a, name)
        if a.ndim == 1 and len(shape) == 2 and shape[0] == 1:
            a = a.reshape(1, -1)
        if a.shape != tuple(shape):
            raise InvalidInput(
                f"{name} has shape {a.shape} but policy_logprobs has shape {tuple(shape)}: "
                "they must match"
            )
        a = a.astype(np.int64, copy=False)
    if a.size and a.min() < 0:
        negative = a < 0
        bad = negative if mask is None else negative & mask
        if bad.any():
            i, j = np.unravel_index(int(np.argmax(bad)), a.shape)
            where = position(name, int(i), int(j), layout)
            raise InvalidInput(f"{where} is {a[i, j]}: token ids under the mask must be >= 0")
        a = np.where(negative, 0, a)
    return a


def _int_dtype(a: np.ndarray, name: str) -> None:
    if a.dtype.kind not in "iu":
        raise InvalidInput(f"{name} has dtype {a.dtype}: expected integer token ids")
