"""The one validator of log-prob batches, shared by ``monitor.divergence`` and the live client
(``monitor.ingest.client``): what a ragged batch is, which dtypes are read and how they are
widened, mask checks, and the messages that name the argument, the problem and the first
offending position in row-major order."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.divergence._constants import LOGPROB_TOLERANCE
from monitor.errors import InvalidInput


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
        pol, refa, m, extras = _ragged_inputs(policy, ref, mask, optional)
    else:
        pol = float_array(policy, "policy_logprobs")
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
    return Batch(
        policy=pol,
        ref=refa,
        mask=m,
        rollout=extras[0],
        entropies=extras[1],
        rewards=None if rewards is None else check_rewards(rewards, pol.shape[0]),
        n_tokens=int(n_tokens),
        layout=layout,
    )


_Inputs = tuple[np.ndarray, np.ndarray, np.ndarray | None, list[np.ndarray | None]]


def _dense_inputs(
    policy: np.ndarray, ref: Any, mask: Any, optional: Sequence[tuple[Any, str]], layout: str
) -> _Inputs:
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


def _ragged_inputs(
    policy: Any, ref: Any, mask: Any, optional: Sequence[tuple[Any, str]]
) -> _Inputs:
    pol, m, lengths = pad_ragged(policy, "policy_logprobs", None)
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
            return np.asarray(t.numpy())
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} could not be read as an array: {exc}") from None


def float_array(x: Any, name: str) -> np.ndarray:
    """x as float32 (for 16/32-bit floats) or float64 (for float64 and integers)."""
    a = to_numpy(x, name)
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


def as_2d(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 2:
        return a
    if a.ndim == 1:
        return a.reshape(1, -1)
    raise InvalidInput(
        f"{name} has shape {a.shape}: expected (batch, tokens), one 1-D sequence, or a list of "
        "1-D sequences"
    )


def same_shape(a: np.ndarray, like: np.ndarray, name: str) -> np.ndarray:
    if a.shape != like.shape:
        raise InvalidInput(
            f"{name} has shape {a.shape} but policy_logprobs has shape {like.shape}: "
            "they must match"
        )
    return a


def check_mask(m: np.ndarray, name: str, layout: str) -> np.ndarray:
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


def pad_ragged(
    seqs: Sequence[Any], name: str, lengths: np.ndarray | None, is_mask: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad a list of 1-D sequences to (B, T_max) with a validity mask."""
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
                f"{name}[{i}] has {lens[i]} tokens but policy_logprobs[{i}] has {lengths[i]}"
            )
    width = int(lens.max()) if len(lens) else 0
    dtype = np.result_type(*[a.dtype for a in arrays]) if arrays else np.float32
    out = np.zeros((len(arrays), width), dtype=dtype)
    valid = np.arange(width) < lens[:, None]
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, valid, lens


def check_rewards(x: Any, n_seq: int) -> np.ndarray:
    r = float_array(x, "rewards").astype(np.float64, copy=False)
    if r.shape != (n_seq,):
        raise InvalidInput(
            f"rewards has shape {r.shape} but the batch has {n_seq} sequences: "
            "pass one reward per sequence"
        )
    bad = np.flatnonzero(~np.isfinite(r))
    if len(bad):
        raise InvalidInput(f"rewards[{bad[0]}] is {r[bad[0]]}: rewards must be finite")
    return r


def first_problem(batch: Batch) -> InvalidInput | None:
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
                return InvalidInput(value_message(batch.where(name, r0 + int(i), int(j)), v, kind))
    return None


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:+.6g}"


def value_message(where: str, v: float, kind: str) -> str:
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
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} is {x!r}: expected a number") from None
    if not math.isfinite(v):
        raise InvalidInput(f"{name} is {v}: it must be finite")
    return v
