"""What ``log_step`` and ``add_to_step`` do on the caller's thread: check the arguments of one
call and copy them into a :class:`~monitor.ingest.writer.StepItem` for the background writer.

The checks are those of :mod:`monitor.divergence.inputs` (one notion of a ragged batch, one
dtype policy, one mask rule, one wording of errors), plus what only the live client needs:
a bound on the step's size before anything is copied, private copies that the trainer may
overwrite at once, torch tensors copied without waiting for the device
(:mod:`monitor.ingest.tensors`; their values are then checked in the background), and
empty responses counted rather than refused. Keep it cheap: it runs in the training loop.
numpy arrays of one shape with a bool mask (the common case) are copied and checked in one
C call that releases the GIL once (:mod:`monitor.ingest.checked_copy`); the numpy path here
gives the same arrays and errors for the rest.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from monitor.divergence import inputs
from monitor.errors import InvalidInput
from monitor.ingest import checked_copy
from monitor.ingest.tensors import Deferred, host_copy, is_tensor, now
from monitor.ingest.text import check_metric_name
from monitor.ingest.writer import STEP_VALUES_MAX, StepItem

#: Extra metric holding how many sequences of a step had an empty response (mask row all
#: zero, e.g. the policy emitted EOS at once). Their KL is no data, not 0: the step's
#: statistics cover the other sequences, and this count keeps the dropped ones visible.
EMPTY_RESPONSES_METRIC = "klmon/empty_responses"


class StepArgs(NamedTuple):
    """The arguments of one ``log_step``/``add_to_step`` call, as the caller passed them."""

    policy_logprobs: Any
    ref_logprobs: Any
    mask: Any = None
    rewards: Any = None
    kl_coef: Any = None
    texts: Any = None
    tokens: Any = None
    metrics: Mapping[str, Any] | None = None
    rollout_logprobs: Any = None
    entropies: Any = None
    token_ids: Any = None


class _TokenArrays(NamedTuple):
    """The copied (B, T) log-prob arrays of a call, its mask and how the caller laid them out."""

    policy: np.ndarray
    ref: np.ndarray
    mask: np.ndarray | None
    layout: inputs.Layout
    n_empty: int  # sequences whose response is empty (mask row all zero)
    extra: dict[str, np.ndarray]  # rollout_logprobs/entropies copied with them (padded alike)


def build_item(
    step: int,
    wall: float,
    args: StepArgs,
    *,
    check_values: bool = True,
    allow_all_empty: bool = False,
) -> StepItem:
    """The StepItem of one call; InvalidInput naming the argument when it is unusable.

    ``check_values``: look for NaN/inf/positive log-probs under the mask here (else the
    background does, and a bad step is stored as rejected). ``allow_all_empty``: a call whose
    responses are all empty is fine (one part of a step built from several calls).
    """
    arrays = _token_arrays(args, allow_all_empty, check_values)
    extra = _extra_arrays(args, arrays, check_values)
    b = arrays.policy.shape[0]
    metrics = checked_metrics(args.metrics) if args.metrics else None
    token_ids, ids_problem = (None, None)
    if args.token_ids is not None:
        token_ids, ids_problem = _token_ids(args.token_ids, arrays)
    return StepItem(
        step=step,
        wall_time=wall,
        policy_logprobs=arrays.policy,
        ref_logprobs=arrays.ref,
        mask=arrays.mask,
        rewards=None if args.rewards is None else _rewards(args.rewards, b),
        kl_coef=None if args.kl_coef is None else inputs.check_scalar(args.kl_coef, "kl_coef"),
        texts=None if args.texts is None else _texts(args.texts, b),
        tokens=None if args.tokens is None else _tokens(args.tokens, b),
        metrics=_with_empty_count(metrics, arrays.n_empty),
        extra=extra or None,
        token_ids=token_ids,
        token_ids_problem=ids_problem,
        empty_rows=arrays.n_empty if isinstance(arrays.mask, np.ndarray) else None,
    )


# --- phase 1: the log-prob arrays and the mask -------------------------------------------------


def _token_arrays(args: StepArgs, allow_all_empty: bool, check_values: bool) -> _TokenArrays:
    if inputs.is_sequence_list(args.policy_logprobs):
        arrays = _ragged_arrays(args, allow_all_empty)
    else:
        arrays = _fused_arrays(args, allow_all_empty, check_values) or _dense_arrays(
            args, allow_all_empty, check_values
        )
    if check_values and arrays.layout == "ragged":  # dense ones are checked as copied
        for name, a in (("policy_logprobs", arrays.policy), ("ref_logprobs", arrays.ref)):
            _check_values(a, name, arrays.mask, "logprob", arrays.layout)
    return arrays


def _ragged_arrays(args: StepArgs, allow_all_empty: bool) -> _TokenArrays:
    """Lists of 1-D sequences, right-padded (the padding is outside the mask); so are
    rollout_logprobs and entropies, which are then lists of sequences too."""
    optional = [(getattr(args, name), name) for name in _EXTRA_KINDS]
    lp, ref, mask, extras = inputs.ragged_inputs(
        args.policy_logprobs, args.ref_logprobs, args.mask, optional, check_shape=_check_size
    )
    n_empty = _count_empty_rows(mask, allow_all_empty)
    if args.mask is None and mask.all():
        mask = None  # sequences of one length: the same item as a (B, T) array
    padded = {name: a for (_, name), a in zip(optional, extras, strict=True) if a is not None}
    return _TokenArrays(lp, ref, mask, "ragged", n_empty, padded)


def _fused_arrays(args: StepArgs, allow_all_empty: bool, check_values: bool) -> _TokenArrays | None:
    """numpy float arrays of one shape and a bool mask (the common case), with the optional
    per-token arrays, copied and checked in one C call (:mod:`monitor.ingest.checked_copy`);
    None for anything else (the numpy path gives the same arrays and errors)."""
    names = ["policy_logprobs", "ref_logprobs"]
    names += [name for name in _EXTRA_KINDS if getattr(args, name) is not None]
    values = [getattr(args, name) for name in names]
    if not checked_copy.usable(values, args.mask, STEP_VALUES_MAX):
        return None
    kinds: list[inputs.Kind] = ["logprob", "logprob", *(_EXTRA_KINDS[n] for n in names[2:])]
    copied = checked_copy.copy(values, kinds, args.mask, check_values)
    if copied.mask is not None:
        _refuse_all_empty(copied.n_empty, copied.mask.shape[0], allow_all_empty)
    layout: inputs.Layout = "1d" if values[0].ndim == 1 else "2d"
    if check_values:
        checked_copy.raise_first_bad(copied, names, kinds, layout)
    lp, ref, *extra = copied.arrays
    extras = dict(zip(names[2:], extra, strict=True))
    return _TokenArrays(lp, ref, copied.mask, layout, copied.n_empty, extras)


def _dense_arrays(args: StepArgs, allow_all_empty: bool, check_values: bool) -> _TokenArrays:
    """(B, T) arrays (or one 1-D sequence), copied, then each checked while in cache."""
    mask, n_empty = None, 0
    if args.mask is not None:
        mask = _mask_copy(args.mask)
        if not isinstance(mask, Deferred):  # a device mask: empty rows found in the background
            n_empty = _count_empty_rows(mask, allow_all_empty)
    lp, layout = _float_copy(args.policy_logprobs, "policy_logprobs")
    if lp.shape[0] == 0 or lp.shape[1] == 0:
        raise InvalidInput(f"empty batch: policy_logprobs has shape {lp.shape}")
    if mask is not None:
        inputs.same_shape(mask, lp, "mask")
    if check_values:
        _check_values(lp, "policy_logprobs", mask, "logprob", layout)
    ref = inputs.same_shape(_float_copy(args.ref_logprobs, "ref_logprobs")[0], lp, "ref_logprobs")
    if check_values:
        _check_values(ref, "ref_logprobs", mask, "logprob", layout)
    return _TokenArrays(lp, ref, mask, layout, n_empty, {})


def _mask_copy(mask: Any) -> np.ndarray:
    """A 2-D bool copy of the mask (a device bool mask stays a Deferred copy)."""
    _check_size(getattr(mask, "shape", None), "mask")
    raw = _to_array(mask, "mask")
    if isinstance(raw, Deferred) and raw.dtype != np.bool_:
        raw = raw.resolve()
    layout = "1d" if raw.ndim == 1 else "2d"
    raw = inputs.as_2d(raw, "mask")
    return raw if isinstance(raw, Deferred) else inputs.check_mask(raw, "mask", layout)


def _count_empty_rows(m: np.ndarray, allow_all: bool = False) -> int:
    """Number of sequences without a response token; InvalidInput when that is all of them
    (unless ``allow_all``: one part of a step built from several calls may be all empty)."""
    n_empty = int(m.shape[0] - np.count_nonzero(m.any(axis=1)))
    _refuse_all_empty(n_empty, m.shape[0], allow_all)
    return n_empty


def _refuse_all_empty(n_empty: int, n_rows: int, allow_all: bool) -> None:
    if n_empty and n_empty == n_rows and not allow_all:
        raise InvalidInput(all_empty_reason(n_empty))


def all_empty_reason(n_sequences: int) -> str:
    """Why a step whose responses are all empty is refused (one call, or a merged step)."""
    return (
        f"every one of the {n_sequences} sequences has an empty response (each mask row is all "
        "zero): the step has no KL to record"
    )


# --- phase 2: the optional per-token arrays ----------------------------------------------------


#: The optional per-token inputs and what they hold.
_EXTRA_KINDS: dict[str, inputs.Kind] = {"rollout_logprobs": "logprob", "entropies": "entropy"}


def _extra_arrays(args: StepArgs, arrays: _TokenArrays, check_values: bool) -> dict[str, Any]:
    """rollout_logprobs and entropies, shaped like the log-probs (lists of sequences when
    those are)."""
    extra: dict[str, Any] = {}
    for name, kind in _EXTRA_KINDS.items():
        value = getattr(args, name)
        if value is None:
            continue
        checked = name in arrays.extra and arrays.layout != "ragged"  # copied with a check
        if name in arrays.extra:
            a = arrays.extra[name]
        else:
            a = inputs.same_shape(_float_copy(value, name)[0], arrays.policy, name)
        if check_values and not checked:
            _check_values(a, name, arrays.mask, kind, arrays.layout)
        extra[name] = a
    return extra


def _token_ids(value: Any, arrays: _TokenArrays) -> tuple[Any, str | None]:
    """A private copy of ``token_ids``, or None and why they are unusable: bad ids cost the
    step its token ledger, never its other data."""
    try:
        if is_tensor(value):
            value = host_copy(value)
            if isinstance(value, Deferred):
                return _unchecked_ids(value, arrays), None
        if not inputs.is_sequence_list(value):
            value = inputs.to_numpy(value, "token_ids")
            if isinstance(arrays.mask, Deferred):
                return np.array(_unchecked_ids(value, arrays), dtype=np.int64), None
        ids = inputs.check_token_ids(value, arrays.policy.shape, arrays.layout, arrays.mask)
        if isinstance(value, np.ndarray) and np.shares_memory(ids, value):
            ids = ids.copy()  # the trainer may overwrite its buffer at once
        return ids, None
    except InvalidInput as exc:
        return None, str(exc)


def _unchecked_ids(a: Any, arrays: _TokenArrays) -> Any:
    """``a`` (B, T) when it holds integers of the log-probs' shape. Its values wait for the
    background (``records._usable_token_ids``): a device tensor is not read here, and which
    ids must be >= 0 depends on a device mask."""
    if a.dtype.kind not in "iu":
        raise InvalidInput(f"token_ids has dtype {a.dtype}: expected integer token ids")
    return inputs.same_shape(inputs.as_2d(a, "token_ids"), arrays.policy, "token_ids")


# --- phase 3: the per-sequence inputs ----------------------------------------------------------


def _rewards(value: Any, b: int) -> np.ndarray:
    """One finite float64 reward per sequence ((B, 1) is taken as (B,))."""
    return inputs.check_rewards(now(_to_array(value, "rewards")).reshape(-1), b)


def _texts(texts: Any, b: int) -> tuple[list[Any] | None, list[Any] | None]:
    if not isinstance(texts, Sequence) or len(texts) != 2:
        raise InvalidInput("texts must be a pair (prompts, responses)")
    prompts, responses = texts
    for label, seq in (("prompts", prompts), ("responses", responses)):
        if seq is not None and len(seq) != b:
            raise InvalidInput(f"texts: {len(seq)} {label} for a batch of {b} sequences")
    return (
        None if prompts is None else list(prompts),
        None if responses is None else list(responses),
    )


def _tokens(tokens: Any, b: int) -> list[Any]:
    if len(tokens) != b:
        raise InvalidInput(f"tokens: {len(tokens)} sequences for a batch of {b}")
    return list(tokens)


# --- copies and checks -------------------------------------------------------------------------


def _to_array(value: Any, name: str) -> np.ndarray:
    """A private numpy copy of an array-like (numpy, torch on any device, tensor-likes, nested
    lists). A torch tensor may come back as a Deferred copy (bfloat16, a device tensor): see
    ``monitor.ingest.tensors``; its values are then checked in the background."""
    if value is None:
        raise InvalidInput(f"{name} is required")
    if is_tensor(value):
        return host_copy(value)  # type: ignore[return-value]
    return np.array(inputs.to_numpy(value, name), copy=True)


def _float_copy(value: Any, name: str) -> tuple[np.ndarray, inputs.Layout]:
    """A private 2-D float copy and the caller's layout. Floats are copied as they are (the
    summary widens them by :func:`~monitor.divergence.inputs.working_dtype`); what is not a
    float (integers, ml_dtypes bfloat16) is widened to its working dtype here."""
    _check_size(getattr(value, "shape", None), name)
    arr = _to_array(value, name)
    _check_size(arr.shape, name)
    if arr.dtype.kind != "f":
        arr = now(arr).astype(inputs.working_dtype(arr.dtype, name))
    layout: inputs.Layout = "1d" if arr.ndim == 1 else "2d"
    return inputs.as_2d(arr, name), layout


def _check_size(shape: Any, name: str) -> None:
    """Refuse a step above STEP_VALUES_MAX values per array, before copying it."""
    try:
        n = math.prod(int(d) for d in shape)
    except (TypeError, ValueError):  # no shape (a list), or not one we can read
        return
    if n > STEP_VALUES_MAX:
        raise InvalidInput(
            f"{name} has {n} values (shape {tuple(shape)}): a step takes at most "
            f"{STEP_VALUES_MAX} per rank; log fewer sequences per call or per rank"
        )


def _check_values(
    a: np.ndarray, name: str, mask: np.ndarray | None, kind: inputs.Kind, layout: inputs.Layout
) -> None:
    if isinstance(a, Deferred) or isinstance(mask, Deferred):
        return  # values not on the host yet: checked in the background
    inputs.check_values(a, name, mask, kind, layout)


# --- metrics -----------------------------------------------------------------------------------


def _with_empty_count(metrics: dict[str, Any] | None, n_empty: int) -> dict[str, Any] | None:
    if not n_empty:
        return metrics
    return {**(metrics or {}), EMPTY_RESPONSES_METRIC: n_empty}


def checked_metrics(metrics: Mapping[str, Any], *, lenient: bool = False) -> dict[str, Any]:
    """Metric names and values as stored; ``lenient``: leave bad ones out instead of raising
    (for a step stored as rejected)."""
    if not isinstance(metrics, Mapping):
        if lenient:
            return {}
        raise InvalidInput(f"metrics must be a mapping of name to number, got {type(metrics)}")
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        try:
            name = check_metric_name(k)
            value = _metric_value(v, name)
        except InvalidInput:
            if lenient:
                continue
            raise
        out[name] = value
    return out


def _metric_value(v: Any, name: str) -> float | None:
    """The float stored for a metric: None for NaN/inf; InvalidInput for a non-number or an
    integer beyond the float range (10**400)."""
    if v is None:
        return None
    ok = (isinstance(v, numbers.Real) and not isinstance(v, bool)) or (
        hasattr(v, "item") and getattr(v, "ndim", 0) == 0
    )
    if not ok:
        raise InvalidInput(f"metrics[{name!r}] must be a number (got {type(v).__name__})")
    try:
        x = float(v.item() if hasattr(v, "item") else v)
    except (OverflowError, TypeError, ValueError) as exc:
        raise InvalidInput(f"metrics[{name!r}] is not storable as a float: {exc}") from None
    return x if math.isfinite(x) else None
