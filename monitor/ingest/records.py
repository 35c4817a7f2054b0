"""The records of the background writer, built without threads or a database: the work items a
``log_step`` call hands over, the step summary record the processor appends to the spool
(summary or shard partials, histogram, drill-down samples, metrics, payload hash), the raw
record of a spilled step and its way back to an item, a trainer's scalar step, and the smaller
stand-ins for a record the spool cannot take. Every function here is deterministic: the same
input gives the same record, so a replay hashes the same.
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from monitor.divergence.inputs import check_token_ids
from monitor.divergence.ledger import LEDGER_K
from monitor.errors import InvalidInput
from monitor.formats import json_safe
from monitor.ingest.tensors import resolve_arrays
from monitor.ingest.text import clean_joined, clean_optional
from monitor.ingest.vocab import Vocabulary
from monitor.store import STEP_QUANTITIES
from monitor.store.sample_codec import encode_sample

log = logging.getLogger("klmon.ingest")

#: Extra metric: 1 at a step whose ``token_ids`` were unusable (the step is stored without
#: its token ledger; the reason is logged).
TOKEN_IDS_REJECTED_METRIC = "klmon/rejected_token_ids"

STEP_VALUES_MAX = 2**26
"""The most values (B x T) one array of a step may hold per rank; ``log_step`` refuses larger
ones with InvalidInput. (1024, 32768) is half of it; its summary takes ~0.1 s."""


# --- the work items the caller hands over ----------------------------------------------------


@dataclass(slots=True)
class StepItem:
    """One validated log_step call: private copies of the arrays, references to the texts."""

    step: int
    wall_time: float
    policy_logprobs: np.ndarray | None
    ref_logprobs: np.ndarray | None
    mask: np.ndarray | None
    rewards: np.ndarray | None = None
    kl_coef: float | None = None
    texts: tuple[Sequence[Any], Sequence[Any]] | None = None
    tokens: Sequence[Any] | None = None
    metrics: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] | None = None
    rejected: str | None = None
    token_ids: Any = None  # (B, T) int64 like the log-probs (a Deferred torch copy until resolved)
    token_ids_problem: str | None = None  # why the token_ids given were left out
    empty_rows: int | None = None  # mask rows without a response token, if the caller counted


@dataclass(slots=True)
class ControlItem:
    """A record that needs no summary: a run status change or metrics without logprobs."""

    record: dict[str, Any]


@dataclass
class WriterConfig:
    """Knobs of the background writer (see ``monitor.init``)."""

    samples_top: int = 3
    samples_random: int = 2
    queue_size: int = 64
    queue_bytes: int = 64 * 1024 * 1024
    flush_interval: float = 1.0
    max_batch: int = 2000
    max_batch_bytes: int = 32 * 1024 * 1024
    backoff_initial: float = 0.25
    backoff_max: float = 5.0
    ledger_k: int = LEDGER_K
    vocabulary: Vocabulary | None = None


# --- summarising one step (processor thread) ---------------------------------------------------


def _metric_list(metrics: Mapping[str, Any] | None) -> list[list[Any]]:
    out: list[list[Any]] = []
    for name, value in (metrics or {}).items():
        if value is None:
            out.append([str(name), None])
            continue
        try:
            v = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidInput(f"metrics[{name!r}] is not storable as a float: {exc}") from None
        out.append([str(name), v if math.isfinite(v) else None])
    return out


def summarize_item(item: StepItem, header: Mapping[str, Any], cfg: WriterConfig) -> dict[str, Any]:
    """The spool record of one step: summary (or shard partials), histogram, samples, metrics
    and a payload hash. Deterministic: the same input always gives the same record."""
    from monitor import divergence

    resolve_arrays(item)  # torch copies finished here, off the caller's thread
    rank = int(header.get("rank", 0))
    world_size = int(header.get("world_size", 1))
    metrics: list[list[Any]] = []
    if rank == 0:
        try:
            metrics = _metric_list(item.metrics)
        except InvalidInput as exc:
            item.rejected = item.rejected or str(exc)
    record: dict[str, Any] = {
        "type": "step",
        "step": item.step,
        "rank": rank,
        "t": item.wall_time,
        "status": "ok",
        "metrics": metrics,
    }
    if item.rejected is None:
        try:
            record.update(_summarize_arrays(item, header, cfg, divergence, world_size))
        except InvalidInput as exc:
            # Found only by the full checks of the background (the call checks the cheap part)
            item.rejected = str(exc)
        except Exception as exc:  # a bug below us must not wedge the writer on one step
            log.exception("klmon: step %d could not be summarised", item.step)
            item.rejected = f"could not be summarised: {type(exc).__name__}: {exc}"
    if item.token_ids_problem is not None and rank == 0 and item.rejected is None:
        record["metrics"] = [*record["metrics"], [TOKEN_IDS_REJECTED_METRIC, 1.0]]
    if item.rejected is not None:
        record.update(
            status="rejected",
            reason=item.rejected,
            q=None,
            partials=None,
            samples=[],
            ledger=None,
            vocab=[],
        )
    record["hash"] = _payload_hash(record)
    return record


def _summarize_arrays(
    item: StepItem,
    header: Mapping[str, Any],
    cfg: WriterConfig,
    divergence: Any,
    world_size: int,
) -> dict[str, Any]:
    seq_ids = None if item.empty_rows == 0 else _rows_with_response(item.mask)
    if seq_ids is not None:  # empty responses have no KL: the step is the other sequences
        item = _only_rows(item, seq_ids)
    kwargs: dict[str, Any] = {"mask": item.mask, "rewards": item.rewards, "kl_coef": item.kl_coef}
    if item.extra:
        kwargs.update(item.extra)
    kwargs["token_ids"] = _usable_token_ids(item, header)
    # one thread: the background values CPU over latency (a helper thread costs more CPU
    # in hand-offs and cache misses than it saves in wall time here; same results)
    kwargs["threads"] = 1
    out: dict[str, Any] = {"ledger": None, "vocab": []}
    ledger_ids: Any = None
    if world_size > 1:
        partials = divergence.partials(item.policy_logprobs, item.ref_logprobs, **kwargs)
        if partials.get("ledger") is not None:
            partials["ledger_k"] = cfg.ledger_k  # the merge at the store cuts to this K
            ledger_ids = partials["ledger"]["ids"]
        out["partials"] = partials
        out["q"] = None
        seq_kl = partials.get("seq_kl") if isinstance(partials, Mapping) else None
        if seq_kl is None:
            seq_kl = divergence.sequence_kl(item.policy_logprobs, item.ref_logprobs, mask=item.mask)
        seq_kl = np.asarray(seq_kl, dtype=np.float64)
        out["hist"] = None
    else:
        summary = divergence.summarize(item.policy_logprobs, item.ref_logprobs, **kwargs)
        d = summary.as_dict()
        out["q"] = [json_safe(d.get(c)) for c in STEP_QUANTITIES]
        hist = getattr(summary, "token_hist", None)
        out["hist"] = None if hist is None else np.asarray(hist, dtype=np.int64)
        seq_kl = np.asarray(summary.seq_kl, dtype=np.float64)
        if summary.ledger is not None:
            top = divergence.top_rows(summary.ledger, cfg.ledger_k)
            out["ledger"] = top.as_record(summary.n_tokens)
            ledger_ids = out["ledger"]["ids"]
    if ledger_ids is not None and cfg.vocabulary is not None:
        out["vocab"] = cfg.vocabulary.pending(ledger_ids)
    out["samples"] = select_samples(item, seq_kl, header, cfg, seq_ids)
    return out


#: (project, name, rank) of the runs warned about token ids found bad here: once per run.
_WARNED_TOKEN_IDS: set[tuple[Any, ...]] = set()


def _usable_token_ids(item: StepItem, header: Mapping[str, Any]) -> np.ndarray | None:
    """The step's token ids when they pass ``check_token_ids`` (torch copies are checked
    here); else None, the reason kept in ``token_ids_problem``: bad ids never cost the step
    its other data. The log warns once per run (the metric counts every step)."""
    if item.token_ids is None:
        return None
    assert item.policy_logprobs is not None
    try:
        return check_token_ids(item.token_ids, item.policy_logprobs.shape, "2d", item.mask)
    except InvalidInput as exc:
        item.token_ids_problem = str(exc)
        key = (header.get("project"), header.get("name"), header.get("rank"))
        if key not in _WARNED_TOKEN_IDS:
            _WARNED_TOKEN_IDS.add(key)
            log.warning(
                "klmon: step %d stored without its token ledger: %s (counted in the metric "
                "%s; this warning is shown once)",
                item.step,
                exc,
                TOKEN_IDS_REJECTED_METRIC,
            )
        return None


def _rows_with_response(mask: np.ndarray | None) -> np.ndarray | None:
    """Indices of the sequences with at least one response token; None when that is all."""
    if mask is None:
        return None
    has = mask.any(axis=1)
    return None if has.all() else np.flatnonzero(has)


def _only_rows(item: StepItem, rows: np.ndarray) -> StepItem:
    """item restricted to the sequences ``rows`` (texts and tokens too)."""

    def pick(seq: Sequence[Any] | None) -> list[Any] | None:
        return None if seq is None else [seq[i] for i in rows]

    assert item.policy_logprobs is not None and item.ref_logprobs is not None
    return replace(
        item,
        policy_logprobs=item.policy_logprobs[rows],
        ref_logprobs=item.ref_logprobs[rows],
        mask=None if item.mask is None else item.mask[rows],
        rewards=None if item.rewards is None else item.rewards[rows],
        texts=None if item.texts is None else (pick(item.texts[0]), pick(item.texts[1])),
        tokens=pick(item.tokens),
        extra=None if item.extra is None else {k: v[rows] for k, v in item.extra.items()},
        token_ids=None if item.token_ids is None else np.asarray(item.token_ids)[rows],
    )


def select_samples(
    item: StepItem,
    seq_kl: np.ndarray,
    header: Mapping[str, Any],
    cfg: WriterConfig,
    seq_ids: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The ``samples_top`` highest-KL sequences and ``samples_random`` others drawn with a
    seed fixed by (run, step, rank), so a replay picks the same ones. ``seq_ids``: each
    row's index in the batch as logged, when rows were left out."""
    n = len(seq_kl)
    if n == 0 or (cfg.samples_top <= 0 and cfg.samples_random <= 0):
        return []
    key = np.where(np.isfinite(seq_kl), seq_kl, -np.inf)
    order = np.argsort(-key, kind="stable")
    top = [int(i) for i in order[: max(cfg.samples_top, 0)]]
    others = np.ones(n, dtype=bool)
    others[top] = False
    rest = np.flatnonzero(others)  # setdiff1d(arange(n), top), without its sort
    picked: list[tuple[int, str]] = [(i, "top") for i in top]
    if cfg.samples_random > 0 and len(rest):
        ident = (header.get("project"), header.get("name"), item.step, header.get("rank", 0))
        # random.Random, not numpy's Generator: seeding a Generator costs ~0.1 ms in situ
        chooser = random.Random(zlib.crc32("\0".join(map(str, ident)).encode()))
        chosen = chooser.sample(rest.tolist(), min(cfg.samples_random, len(rest)))
        picked.extend((i, "random") for i in sorted(chosen))
    lp, ref = item.policy_logprobs, item.ref_logprobs
    assert lp is not None and ref is not None
    width = lp.shape[1]
    rows = [i for i, _ in picked]
    columns = [None] * len(rows) if item.mask is None else _response_columns(item.mask, rows)
    prompts, responses = (None, None) if item.texts is None else item.texts
    samples = []
    for (i, kind), cols in zip(picked, columns, strict=True):
        tokens = joined = None
        if item.tokens is not None:
            tokens, joined = _sample_tokens(item.tokens[i], cols, width)
        # the log-probs are stored as float32 (astype converts only a float64 batch)
        payload = encode_sample(
            (lp[i] if cols is None else lp[i, cols]).astype(np.float32, copy=False),
            (ref[i] if cols is None else ref[i, cols]).astype(np.float32, copy=False),
            prompt=None if prompts is None else clean_optional(prompts[i]),
            response=None if responses is None else clean_optional(responses[i]),
            tokens=tokens,
            joined_tokens=joined,
        )
        samples.append(
            {
                "seq_index": i if seq_ids is None else int(seq_ids[i]),
                "kind": kind,
                "kl_seq": json_safe(float(seq_kl[i])),
                "reward": None if item.rewards is None else json_safe(float(item.rewards[i])),
                "payload": payload,
            }
        )
    return samples


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _response_columns(mask: np.ndarray, rows: list[int]) -> list[slice | np.ndarray]:
    """The response positions of the mask rows ``rows``, found for all of them at once: a
    slice where they are one run (the usual mask: the arrays are then read as views, the
    tokens as a list slice), else their indices."""
    sub = np.asarray(mask[rows], dtype=bool)  # nonzero, as np.flatnonzero reads a row
    if sub.shape[1] == 0:  # no columns: argmax has nothing to read
        return [np.flatnonzero(row) for row in sub]
    count = np.count_nonzero(sub, axis=1).tolist()
    first = sub.argmax(axis=1).tolist()
    last = (sub.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)).tolist()
    return [
        slice(a, z + 1) if n and z - a + 1 == n else np.flatnonzero(sub[r])
        for r, (n, a, z) in enumerate(zip(count, first, last, strict=True))
    ]


def _sample_tokens(
    tokens: Any, cols: slice | np.ndarray | None, width: int
) -> tuple[list[str], str]:
    """Clean strings (``clean_joined``) of the response positions ``cols`` (None: all) and
    their concatenation: ``tokens`` may be aligned with the log-prob columns (length T) or
    already hold just the response tokens. No Python loop per token: the usual mask (one
    run of response positions) is a slice, the check of the strings one ``join``, which the
    codec reuses."""
    toks = tokens if isinstance(tokens, list) else list(tokens)
    if cols is not None and len(toks) == width:
        if isinstance(cols, slice):
            if cols.stop - cols.start != width:
                toks = toks[cols]
        elif len(cols) != width:
            idx = cols.tolist()
            toks = list(operator.itemgetter(*idx)(toks)) if len(idx) > 1 else [toks[j] for j in idx]
    return clean_joined(toks)


def _strings(items: Sequence[Any]) -> list[str]:
    """``items`` as a new list of strings; one C-level ``join`` tells that they all are (a
    per-item type check cost ~2 ms a step for 5 samples of 2048 tokens)."""
    try:
        "".join(items)
    except TypeError:
        return [t if type(t) is str else str(t) for t in items]
    return list(items)


def _payload_hash(record: Mapping[str, Any]) -> str:
    """Digest of what a step record would store: a replay hashes the same, any change of
    summary, samples or metrics hashes differently. Samples count by their payload bytes
    (cheaper than their texts and arrays): a spilled step summarised again by a klmon whose
    zstd writes other bytes would count as a conflict (kept as first stored)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(
        f"{record['step']}|{record['rank']}|{record['status']}|{record.get('reason')}|".encode()
    )
    h.update(repr(record.get("q")).encode())
    partials = record.get("partials")
    if partials is not None:
        h.update(_stable_repr(partials).encode())
    hist = record.get("hist")
    if hist is not None:
        h.update(np.ascontiguousarray(hist).tobytes())
    if record.get("ledger") is not None:  # not "vocab": which texts ride along is history
        h.update(_stable_repr(record["ledger"]).encode())
    for s in record.get("samples") or ():  # the payload holds texts, tokens and log-probs
        h.update(f"{s['seq_index']}|{s['kind']}|{s['kl_seq']!r}|{s['reward']!r}|".encode())
        h.update(s["payload"])
    h.update(repr(record.get("metrics")).encode())
    return h.hexdigest()


def _stable_repr(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k!r}:{_stable_repr(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, np.ndarray):
        return f"nd{value.dtype.str}{value.shape}{hashlib.blake2b(value.tobytes()).hexdigest()}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_stable_repr(v) for v in value) + "]"
    return repr(value)


SPILL_TOKENS_MAX = 16384
"""A spilled step keeps its token strings up to this many (B x T); encoding more would block
the training loop too long, so larger spilled batches lose them (samples keep text and
log-probs)."""


def smaller_record(
    record: dict[str, Any], why: str, header: Mapping[str, Any], cfg: WriterConfig
) -> dict[str, Any] | None:
    """A record that fits the spool in place of one that does not (RecordTooLarge): a raw
    step summarised; then a step without its samples; then the step stored as rejected.
    None for a record that is not a step (nothing smaller to keep)."""
    kind = record.get("type")
    if kind == "raw":
        return summarize_item(item_from_raw(record), header, cfg)
    if kind != "step":
        return None
    if record.get("samples"):
        log.warning("klmon: step %s: its samples are too large to keep (%s)", record["step"], why)
        smaller = {**record, "samples": []}
    else:
        smaller = {
            **record,
            "type": "step",
            "status": "rejected",
            "reason": f"too large to store: {why}",
            "q": None,
            "partials": None,
            "hist": None,
            "samples": [],
            "metrics": [],
            "ledger": None,
            "vocab": [],
        }
    smaller["hash"] = _payload_hash(smaller)
    return smaller


def record_bytes(record: Mapping[str, Any]) -> int:
    """About how much memory a summary record holds (its samples' payloads)."""
    return 1024 + sum(len(s["payload"]) for s in record.get("samples") or ())


def item_bytes(item: StepItem | ControlItem) -> int:
    """The bytes of an item's copied arrays (what the writer's queue bounds)."""
    if not isinstance(item, StepItem):
        return 0
    arrays = [
        item.policy_logprobs,
        item.ref_logprobs,
        item.mask,
        item.token_ids,
        *(item.extra or {}).values(),
    ]
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays if a is not None)


def raw_record(item: StepItem, rank: int, vocabulary: Vocabulary | None = None) -> dict[str, Any]:
    """A step spilled by the caller: its arrays as they are (summarised later), and the
    texts of its token ids under the mask (``vocabulary``), so that a ``klmon sync`` without
    the tokenizer still names the ledger it computes."""
    resolve_arrays(item)
    texts = None
    if item.texts is not None:
        prompts, responses = item.texts
        texts = [
            None if prompts is None else [_text(p) for p in prompts],
            None if responses is None else [_text(r) for r in responses],
        ]
    return {
        "type": "raw",
        "step": item.step,
        "rank": rank,
        "t": item.wall_time,
        "lp": item.policy_logprobs,
        "ref": item.ref_logprobs,
        "mask": item.mask,
        "rewards": item.rewards,
        "kl_coef": item.kl_coef,
        "texts": texts,
        "metrics": _metric_list(item.metrics) if rank == 0 else [],
        "extra": dict(item.extra or {}),
        "tokens": _small_tokens(item),
        "token_ids": item.token_ids,
        "token_ids_problem": item.token_ids_problem,
        "vocab": _raw_vocab(item, vocabulary),
    }


def _raw_vocab(item: StepItem, vocabulary: Vocabulary | None) -> list[list[Any]]:
    """[id, text] of the distinct ids under the mask; none when they cannot be read (their
    problem is found again when the step is summarised)."""
    if vocabulary is None or item.token_ids is None:
        return []
    try:
        ids = np.asarray(item.token_ids)
        if item.mask is not None:
            ids = ids[np.asarray(item.mask, dtype=bool)]
        ids = np.unique(ids)
        return vocabulary.texts(ids[ids >= 0].tolist())
    except Exception:  # bad ids or a failing tokenizer: the step still spills
        return []


def _small_tokens(item: StepItem) -> list[list[str]] | None:
    if item.tokens is None or item.policy_logprobs is None:
        return None
    if item.policy_logprobs.size > SPILL_TOKENS_MAX:
        return None
    return [_strings(row) for row in item.tokens]


def item_from_raw(rec: Mapping[str, Any]) -> StepItem:
    texts = rec.get("texts")
    return StepItem(
        step=int(rec["step"]),
        wall_time=float(rec["t"]),
        policy_logprobs=rec["lp"],
        ref_logprobs=rec["ref"],
        mask=rec.get("mask"),
        rewards=rec.get("rewards"),
        kl_coef=rec.get("kl_coef"),
        texts=None if texts is None else (texts[0], texts[1]),
        tokens=rec.get("tokens"),
        metrics=dict(rec.get("metrics") or ()),
        extra=rec.get("extra") or None,
        token_ids=rec.get("token_ids"),
        token_ids_problem=rec.get("token_ids_problem"),
    )


def raw_config(rec: Mapping[str, Any], cfg: WriterConfig) -> WriterConfig:
    """The settings to summarise a spilled raw step with: every ledger id's text goes with
    it, from the live vocabulary (nothing taken as already sent: it may be a replay) or, for
    ``klmon sync``, from the texts the raw record carries."""
    if cfg.vocabulary is not None:
        return replace(cfg, vocabulary=cfg.vocabulary.fresh())
    carried = rec.get("vocab")
    if carried:
        return replace(cfg, vocabulary=Vocabulary({int(i): t for i, t in carried}))
    return cfg


def config_from_header(header: Mapping[str, Any]) -> WriterConfig:
    return WriterConfig(
        samples_top=int(header.get("samples_top", 3)),
        samples_random=int(header.get("samples_random", 2)),
        ledger_k=int(header.get("ledger_k", LEDGER_K)),
    )


def scalar_step_record(
    step: int, wall: float, quantities: Mapping[str, Any], metrics: Mapping[str, Any]
) -> ControlItem:
    """A step record whose columns are given (a trainer's scalars), without a summary."""
    record: dict[str, Any] = {
        "type": "step",
        "step": step,
        "rank": 0,
        "t": wall,
        "status": "ok",
        "metrics": _metric_list(metrics),
        "q": [json_safe(_as_float(quantities.get(c))) for c in STEP_QUANTITIES],
        "partials": None,
        "hist": None,
        "samples": [],
    }
    record["hash"] = _payload_hash(record)
    return ControlItem(record)


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None


__all__ = [
    "STEP_VALUES_MAX",
    "ControlItem",
    "StepItem",
    "WriterConfig",
    "config_from_header",
    "item_from_raw",
    "raw_record",
    "scalar_step_record",
    "select_samples",
    "summarize_item",
]
