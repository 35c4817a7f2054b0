"""The live client's background writer: two daemon threads between the training loop and the
database, with the spool between them.

- The *processor* takes the copied arrays of each ``log_step`` from a bounded queue, computes
  the step summary (``monitor.divergence``), picks the drill-down samples, and appends one
  record to the spool. Once appended, a step is **acknowledged**: it survives the death of
  the process. The processor never touches the database, so a slow or down database never
  backs the queue up. If the training loop outruns the processor and the queue is full,
  ``log_step`` *spills*: it appends the raw arrays to the spool itself (a few ms, no
  summary; the token strings of such a step are not kept) and the committer summarises
  that record later. Memory stays bounded and nothing is dropped.
- The *committer* reads acknowledged records back from the spool in batches and writes them
  to the database (``monitor.store.step_writes``), one transaction per batch. When the
  database fails it keeps its place in the spool, waits (exponential backoff) and replays
  from there when the database is back. Memory stays bounded during any outage: what has not
  been written waits on disk, not in memory. Fully written spool segments are deleted.

``apply_records`` (spool records -> database) is shared with ``klmon sync``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import math
import operator
import queue
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from monitor.errors import DatabaseUnavailable, InvalidInput, KlmonError, SchemaOutOfDate
from monitor.formats import json_safe
from monitor.ingest.spool import (
    DEAD_SUFFIX,
    FILE_MAGIC,
    CorruptRecord,
    DeadLetterFile,
    RecordTooLarge,
    SpoolRecord,
    SpoolWriter,
    iter_records,
)
from monitor.ingest.tensors import resolve_arrays
from monitor.ingest.text import clean_json, clean_optional, clean_strings, clean_text
from monitor.store import (
    STEP_QUANTITIES,
    Database,
    IngestResult,
    StepRecord,
    get_or_create_run,
    set_run_status,
    write_metric_records,
    write_step_records,
)

log = logging.getLogger("klmon.ingest")

STEP_VALUES_MAX = 2**26
"""The most values (B x T) one array of a step may hold per rank; ``log_step`` refuses larger
ones with InvalidInput. (1024, 32768) is half of it; its summary takes ~0.1 s."""

SPILL_MAX_BYTES = 64 * 1024 * 1024
"""A step whose arrays exceed this is never spilled raw to the spool (the record would be too
big to read back cheaply): when the queue is full it is summarised on the caller's thread."""


STATS_KEYS = (
    "logged",  # log_step / log_metrics calls accepted (rejected steps included)
    "acknowledged",  # records appended to the spool (durable against a crash of the process)
    "written",  # step rows (or rank shards) newly stored in the database
    "spooled",  # records that had to wait in the spool because a database write failed
    "replayed",  # of those, records written once the database came back
    "duplicates",  # exact replays of stored steps: no-ops
    "conflicts",  # a different payload for a stored (run, step): refused, never overwritten
    "rejected",  # invalid steps stored as status 'rejected' (on_invalid='log')
    "out_of_order",  # steps logged with a number lower than an earlier one (accepted)
    "spilled",  # steps written raw to the spool by log_step because the queue was full
    "db_errors",  # failed database attempts (each retried)
    "corrupt",  # damaged spool records skipped
    "dropped",  # steps lost: the spool could not be written and the database did not take them
    "dead_letter",  # records the database refused, kept in the dead-letter file
)


class Stats:
    """Counters of a Run, safe to update from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = dict.fromkeys(STATS_KEYS, 0)

    def add(self, key: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._c[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


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
    flush_interval: float = 0.1
    max_batch: int = 2000
    max_batch_bytes: int = 32 * 1024 * 1024
    backoff_initial: float = 0.25
    backoff_max: float = 5.0


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
    if item.rejected is not None:
        record.update(status="rejected", reason=item.rejected, q=None, partials=None, samples=[])
    record["hash"] = _payload_hash(record)
    return record


def _summarize_arrays(
    item: StepItem,
    header: Mapping[str, Any],
    cfg: WriterConfig,
    divergence: Any,
    world_size: int,
) -> dict[str, Any]:
    seq_ids = _rows_with_response(item.mask)
    if seq_ids is not None:  # empty responses have no KL: the step is the other sequences
        item = _only_rows(item, seq_ids)
    kwargs: dict[str, Any] = {"mask": item.mask, "rewards": item.rewards, "kl_coef": item.kl_coef}
    if item.extra:
        kwargs.update(item.extra)
    out: dict[str, Any] = {}
    if world_size > 1:
        partials = divergence.partials(item.policy_logprobs, item.ref_logprobs, **kwargs)
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
    out["samples"] = select_samples(item, seq_kl, header, cfg, seq_ids)
    return out


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
    rest = np.setdiff1d(np.arange(n), np.asarray(top, dtype=np.int64))
    picked: list[tuple[int, str]] = [(i, "top") for i in top]
    if cfg.samples_random > 0 and len(rest):
        ident = (header.get("project"), header.get("name"), item.step, header.get("rank", 0))
        seed = zlib.crc32("\0".join(map(str, ident)).encode())
        rng = np.random.default_rng(seed)
        chosen = rng.choice(rest, size=min(cfg.samples_random, len(rest)), replace=False)
        picked.extend((int(i), "random") for i in sorted(chosen))
    lp, ref, mask = item.policy_logprobs, item.ref_logprobs, item.mask
    assert lp is not None and ref is not None
    samples = []
    for i, kind in picked:
        pos = np.flatnonzero(mask[i]) if mask is not None else np.arange(lp.shape[1])
        sample: dict[str, Any] = {
            "seq_index": i if seq_ids is None else int(seq_ids[i]),
            "kind": kind,
            "kl_seq": json_safe(float(seq_kl[i])),
            "reward": None if item.rewards is None else json_safe(float(item.rewards[i])),
            "prompt": None,
            "response": None,
            "tokens": None,
            "policy_logprobs": lp[i, pos].astype(np.float32),
            "ref_logprobs": ref[i, pos].astype(np.float32),
        }
        if item.texts is not None:
            prompts, responses = item.texts
            sample["prompt"] = None if prompts is None else _text(prompts[i])
            sample["response"] = None if responses is None else _text(responses[i])
        if item.tokens is not None:
            sample["tokens"] = _sample_tokens(item.tokens[i], pos, lp.shape[1])
        samples.append(sample)
    return samples


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _sample_tokens(tokens: Any, pos: np.ndarray, width: int) -> list[str]:
    """Tokens of the response positions: ``tokens`` may be aligned with the log-prob columns
    (length T) or already hold just the response tokens."""
    toks = tokens if isinstance(tokens, list) else list(tokens)
    if len(toks) == width and len(pos) != width:
        toks = list(operator.itemgetter(*pos.tolist())(toks)) if len(pos) > 1 else [toks[pos[0]]]
    if all(type(t) is str for t in toks):
        return list(toks)
    return [str(t) for t in toks]


def _payload_hash(record: Mapping[str, Any]) -> str:
    """Digest of what a step record would store: a replay hashes the same, any change of
    summary, samples or metrics hashes differently."""
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
    for s in record.get("samples") or ():
        h.update(f"{s['seq_index']}|{s['kind']}|{s['kl_seq']!r}|{s['reward']!r}|".encode())
        h.update(f"{s['prompt']!r}|{s['response']!r}|".encode())
        if s.get("tokens") is not None:
            h.update("\x1f".join(s["tokens"]).encode("utf-8", "surrogatepass"))
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


def _smaller(
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
        }
    smaller["hash"] = _payload_hash(smaller)
    return smaller


def _record_bytes(record: Mapping[str, Any]) -> int:
    """About how much memory a summary record holds (its samples' arrays and strings)."""
    n = 1024
    for sample in record.get("samples") or ():
        for v in sample.values():
            if isinstance(v, np.ndarray):
                n += v.nbytes
            elif isinstance(v, str):
                n += len(v)
            elif isinstance(v, list):
                n += sum(len(t) + 50 for t in v if isinstance(t, str))
    return n


def _item_bytes(item: StepItem | ControlItem) -> int:
    if not isinstance(item, StepItem):
        return 0
    arrays = [item.policy_logprobs, item.ref_logprobs, item.mask, *(item.extra or {}).values()]
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays if a is not None)


def raw_record(item: StepItem, rank: int) -> dict[str, Any]:
    """A step spilled by the caller: its arrays as they are (summarised later)."""
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
    }


def _small_tokens(item: StepItem) -> list[list[str]] | None:
    if item.tokens is None or item.policy_logprobs is None:
        return None
    if item.policy_logprobs.size > SPILL_TOKENS_MAX:
        return None
    return [[t if type(t) is str else str(t) for t in row] for row in item.tokens]


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
    )


def config_from_header(header: Mapping[str, Any]) -> WriterConfig:
    return WriterConfig(
        samples_top=int(header.get("samples_top", 3)),
        samples_random=int(header.get("samples_random", 2)),
    )


# --- spool records -> database (committer and klmon sync) ------------------------------------


@dataclass
class ApplyResult:
    """What writing a list of spool records did."""

    ingest: IngestResult = field(default_factory=IngestResult)
    steps: int = 0
    rejected: int = 0
    raw_rejected: int = 0  # spilled steps found invalid when summarised here
    metrics_records: int = 0
    status: str | None = None
    dead: int = 0  # records the database refused (see apply_isolated)

    def add(self, other: ApplyResult) -> None:
        self.ingest.add(other.ingest)
        self.steps += other.steps
        self.rejected += other.rejected
        self.raw_rejected += other.raw_rejected
        self.metrics_records += other.metrics_records
        self.status = other.status or self.status
        self.dead += other.dead


def to_step_record(rec: Mapping[str, Any], quantities: Sequence[str] | None = None) -> StepRecord:
    q = rec.get("q")
    values: tuple[Any, ...] | None = None
    if q is not None:
        if quantities is None or tuple(quantities) == STEP_QUANTITIES:
            values = tuple(q)
        else:  # written by another klmon version: map by name
            by_name = dict(zip(quantities, q, strict=False))
            values = tuple(by_name.get(c) for c in STEP_QUANTITIES)
    return StepRecord(
        step=int(rec["step"]),
        wall_time=float(rec["t"]),
        payload_hash=rec.get("hash"),
        values=values,
        status=str(rec.get("status") or "ok"),
        reject_reason=clean_optional(rec.get("reason")),
        rank=int(rec.get("rank") or 0),
        partials=rec.get("partials"),
        hist=rec.get("hist"),
        samples=[_clean_sample(x) for x in rec.get("samples") or ()],
        metrics=_clean_metrics(rec.get("metrics")),
    )


def _clean_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A sample whose texts and token strings both databases can store (the spool keeps them
    as logged; see ``monitor.ingest.text``)."""
    out = dict(sample)
    out["prompt"] = clean_optional(sample.get("prompt"))
    out["response"] = clean_optional(sample.get("response"))
    if sample.get("tokens") is not None:
        out["tokens"] = clean_strings(sample["tokens"])
    return out


def _clean_metrics(metrics: Any) -> list[tuple[str, float | None]]:
    """Metric (name, value) pairs with storable names; NUL removed from names written by an
    older client (the call refuses them now)."""
    return [(clean_text(str(n)), v) for n, v in metrics or ()]


def ensure_run(db: Database, header: Mapping[str, Any]) -> int:
    """The id of the run a spool file belongs to, creating the run if the database does not
    know it (its process may never have reached the database)."""
    info = get_or_create_run(
        db,
        clean_text(str(header["project"])),
        clean_text(str(header["name"])),
        config=clean_json(dict(header.get("config") or {})),
        tags=clean_json(list(header.get("tags") or [])),
        world_size=int(header.get("world_size") or 1),
        source=str(header.get("source") or "live"),
        now=float(header.get("started_at") or time.time()),
    )
    return info.id


def apply_records(
    db: Database,
    run_id: int,
    header: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    *,
    seen_at: float | None = None,
) -> ApplyResult:
    """Write spool records of one run (steps, metrics, status) to the database."""
    out = ApplyResult()
    world_size = int(header.get("world_size") or 1)
    quantities = header.get("quantities")
    steps: list[StepRecord] = []
    metric_groups: list[tuple[int, list[tuple[str, float | None]]]] = []
    status: tuple[str, float] | None = None
    for rec in records:
        kind = rec.get("type")
        if kind == "raw":  # spilled by log_step: summarise it now
            rec = summarize_item(item_from_raw(rec), header, config_from_header(header))
            kind = "step"
            if rec["status"] == "rejected":
                out.raw_rejected += 1
        if kind == "step":
            sr = to_step_record(rec, quantities)
            steps.append(sr)
            if sr.status == "rejected":
                out.rejected += 1
        elif kind == "metrics":
            metric_groups.append((int(rec["step"]), _clean_metrics(rec.get("metrics"))))
        elif kind == "status":
            status = (str(rec["status"]), float(rec.get("t") or time.time()))
    if steps:
        out.ingest = write_step_records(db, run_id, steps, world_size=world_size, seen_at=seen_at)
        out.steps = len(steps)
    if metric_groups:
        out.ingest.metrics += write_metric_records(db, run_id, metric_groups, seen_at=seen_at)
        out.metrics_records = len(metric_groups)
    if status is not None:
        set_run_status(db, run_id, status[0], now=status[1])
        out.status = status[0]
    return out


DeadLetter = Callable[[Mapping[str, Any], str], None]
"""Called with a record the database refused and the reason."""


def apply_isolated(
    db: Database,
    run_id: int,
    header: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    dead_letter: DeadLetter,
) -> ApplyResult:
    """:func:`apply_records`, where a record the database refuses is that record's problem:
    the batch is retried one record at a time, each refused one goes to ``dead_letter`` and
    the rest is written. An unreachable database (DatabaseUnavailable, SchemaOutOfDate)
    still raises: then nothing is wrong with the records, and they are retried later."""
    try:
        return apply_records(db, run_id, header, records)
    except (DatabaseUnavailable, SchemaOutOfDate):
        raise
    except Exception as exc:
        if len(records) == 1:
            dead_letter(records[0], _reason(exc))
            out = ApplyResult()
            out.dead = 1
            return out
    out = ApplyResult()
    for rec in records:
        try:
            one = apply_records(db, run_id, header, [rec])
        except (DatabaseUnavailable, SchemaOutOfDate):
            raise
        except Exception as exc:
            dead_letter(rec, _reason(exc))
            out.dead += 1
            continue
        out.add(one)
    return out


def _reason(exc: BaseException) -> str:
    return clean_text(f"{type(exc).__name__}: {exc}".splitlines()[0])[:500]


# --- the two threads ------------------------------------------------------------------------


class BackgroundWriter:
    """Processor and committer threads of one Run (see the module doc)."""

    def __init__(
        self,
        *,
        header: dict[str, Any],
        db: Database,
        spool: SpoolWriter,
        cfg: WriterConfig,
        stats: Stats,
    ) -> None:
        self.header = header
        self.db = db
        self.spool = spool
        self.cfg = cfg
        self.stats = stats
        self.run_id: int | None = None
        self.last_error: str | None = None
        # Bounded by items and by bytes (the copied arrays): past either, log_step spills.
        self._queue: queue.Queue[tuple[StepItem | ControlItem | None, int]] = queue.Queue()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._submitted = 0
        self._acked = 0
        self._pos = (spool.segment, len(FILE_MAGIC))  # committer's place in the spool
        self._in_outage = False
        self._replaying_until: tuple[int, int] | None = None
        self._acked_steps = 0
        self._committed_steps = 0
        # Records the spool could not take (disk full): written straight to the database.
        self._direct: collections.deque[tuple[dict[str, Any], int]] = collections.deque()
        self._direct_bytes = 0
        self._spool_error: str | None = None
        self._warned_drop = False
        self._dead = DeadLetterFile(spool.directory / f"{spool.stem}{DEAD_SUFFIX}")
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._warned_processor = False
        self._last_commit_mark = 0.0
        self._processor = threading.Thread(
            target=self._process_loop, name="klmon-processor", daemon=True
        )
        self._committer = threading.Thread(
            target=self._commit_loop, name="klmon-committer", daemon=True
        )
        self._processor.start()
        self._committer.start()

    # caller side ------------------------------------------------------------------------------

    def submit(self, item: StepItem | ControlItem) -> None:
        """Hand an item to the processor; never blocks on the database. If the queue is full
        (the processor is behind), spill: append the raw record to the spool right here, so
        memory stays bounded and nothing is dropped."""
        size = _item_bytes(item)
        with self._cond:
            self._submitted += 1
            # A step larger than the whole byte budget still goes in when the queue is empty.
            over = self._queued_bytes + size > self.cfg.queue_bytes and self._queued_bytes > 0
            full = (self._queue.qsize() >= self.cfg.queue_size or over) and size > 0
            if not full:
                self._queued_bytes += size
        if not full:
            self._queue.put((item, size))
        elif size > SPILL_MAX_BYTES:
            # Too big to spill raw: summarise it here (bounded: ~0.1 s for 2**25 values).
            self._append(summarize_item(item, self.header, self.cfg), caller=True)
        else:
            self._spill(item)

    def _spill(self, item: StepItem | ControlItem) -> None:
        if isinstance(item, ControlItem):
            record = item.record
        elif item.rejected is not None or item.policy_logprobs is None:
            record = summarize_item(item, self.header, self.cfg)  # no arrays: cheap
        else:
            record = raw_record(item, int(self.header.get("rank", 0)))
            self.stats.add("spilled")
            if not self._warned_processor:
                self._warned_processor = True
                log.warning(
                    "klmon: the training loop outruns the background writer (queue full): "
                    "spilling raw steps to the spool, summarised later (token strings of "
                    "large batches are not kept)"
                )
        self._append(record, caller=True)

    # processor ------------------------------------------------------------------------------

    def _process_loop(self) -> None:
        while True:
            item, size = self._queue.get()
            with self._cond:
                self._queued_bytes -= size
            if item is None:
                return
            try:
                self._handle(item)
            except Exception as exc:  # pragma: no cover - a bug; the step must not vanish
                log.exception("klmon: could not process a step record")
                if isinstance(item, StepItem):
                    item.rejected = f"could not be processed: {type(exc).__name__}: {exc}"
                    item.texts = item.tokens = item.metrics = None
                    with contextlib.suppress(Exception):
                        self._append(summarize_item(item, self.header, self.cfg))
                        continue
                with self._cond:
                    self._acked += 1
                    self._cond.notify_all()

    def _handle(self, item: StepItem | ControlItem) -> None:
        if isinstance(item, ControlItem):
            record = item.record
        else:
            record = summarize_item(item, self.header, self.cfg)
            if record["status"] == "rejected" and item.policy_logprobs is not None:
                log.warning("klmon: step %d rejected: %s", item.step, record.get("reason"))
        self._append(record)

    def _append(self, record: dict[str, Any], *, caller: bool = False) -> None:
        try:
            # On the caller's thread (a spill) never wait for an fsync.
            self.spool.append(record, may_fsync=not caller)
        except RecordTooLarge as exc:
            smaller = _smaller(record, str(exc), self.header, self.cfg)
            if smaller is not None:
                self._append(smaller, caller=caller)
                return
            log.error("klmon: a %s record is too large for the spool: %s", record["type"], exc)
            with self._cond:
                self._acked += 1
                self._cond.notify_all()
            return
        except OSError as exc:
            self._spool_failed(record, exc)
            return
        self.stats.add("acknowledged")
        is_step = record.get("type") in ("step", "raw")
        if record.get("status") == "rejected":
            self.stats.add("rejected")
        if is_step and self._in_outage:
            self.stats.add("spooled")
        with self._cond:
            self._acked += 1
            self._acked_steps += is_step
            self._cond.notify_all()

    def _spool_failed(self, record: dict[str, Any], exc: OSError) -> None:
        """The spool cannot take a record (disk full, read-only, closed): hold it in memory
        for a direct database write, within ``queue_bytes``; past that (the database is down
        or slower than the loop) it is dropped and counted. Warned once with the reason;
        drops once more with their count."""
        is_step = record.get("type") in ("step", "raw")
        with self._cond:  # the caller's thread (a spill) and the processor both come here
            first, self._spool_error = self._spool_error is None, str(exc)
        if first:
            log.warning(
                "klmon: cannot write the spool %s (%s): steps go straight to the database "
                "while it is up (no crash protection meanwhile); steps it cannot take are "
                "dropped and counted in run.stats['dropped'] (this warning is shown once)",
                self.spool.directory,
                exc,
            )
        if record.get("type") == "raw":
            record = summarize_item(item_from_raw(record), self.header, self.cfg)
        size = _record_bytes(record)
        with self._cond:
            keep = not self._direct or self._direct_bytes + size <= self.cfg.queue_bytes
            if keep:
                self._direct.append((record, size))
                self._direct_bytes += size
            self._acked += 1
            self._acked_steps += is_step and keep
            self._cond.notify_all()
        if not keep and is_step:
            self._drop(1)

    def _drop(self, n: int) -> None:
        if not n:
            return
        self.stats.add("dropped", n)
        with self._cond:
            first, self._warned_drop = not self._warned_drop, True
        if first:
            log.warning(
                "klmon: %d step(s) dropped so far: the spool cannot be written (%s) and the "
                "database %s does not take them; run.stats['dropped'] counts them",
                self.stats.snapshot()["dropped"],
                self._spool_error,
                self.db.safe_url,
            )

    def _dead_letter(self, record: Mapping[str, Any], reason: str) -> None:
        """A record the database refused: into the dead-letter file, counted, warned once."""
        run = {k: self.header.get(k) for k in ("project", "name", "rank", "world_size")}
        try:
            self._dead.append(dict(record), reason, run)
        except OSError as exc:
            log.error("klmon: could not write the dead-letter file %s: %s", self._dead.path, exc)
            self._drop(int(record.get("type") in ("step", "raw")))
            return
        n = self.stats.snapshot()["dead_letter"]
        self.stats.add("dead_letter")
        if n == 0:
            log.warning(
                "klmon: the database refused a record of step %s (%s): kept in %s, the steps "
                "around it go on (counted in run.stats['dead_letter'])",
                record.get("step"),
                reason,
                self._dead.path,
            )

    # committer ------------------------------------------------------------------------------

    def _commit_loop(self) -> None:
        backoff = self.cfg.backoff_initial
        while not self._abandon.is_set():
            with self._cond:
                while not self._has_uncommitted() and not self._drained():
                    if not self._cond.wait(0.5):
                        break  # a quiet half second: fsync (outside the lock), then wait again
                if not self._has_uncommitted() and self._drained():
                    return
                idle = not self._has_uncommitted()
            self.spool.maybe_fsync()
            if idle:
                continue
            if not self._stopping.is_set():
                # Let a few steps gather so one transaction carries several of them.
                self._abandon.wait(self.cfg.flush_interval)
            try:
                self._commit_some()
            except KlmonError as exc:
                self._on_db_error(exc)
                self._abandon.wait(backoff)
                backoff = min(backoff * 2, self.cfg.backoff_max)
                continue
            except Exception as exc:  # a driver error that escaped translation
                self._on_db_error(exc)
                self._abandon.wait(backoff)
                backoff = min(backoff * 2, self.cfg.backoff_max)
                continue
            backoff = self.cfg.backoff_initial

    def _drained(self) -> bool:
        """Stopping, and the processor has appended everything it was given."""
        return self._stopping.is_set() and self._acked >= self._submitted

    def _has_uncommitted(self) -> bool:
        seg, off = self._pos
        end_seg, end_off = self.spool.end()
        return bool(self._direct) or (seg, off) < (end_seg, end_off)

    def _on_db_error(self, exc: BaseException) -> None:
        self.stats.add("db_errors")
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if not self._in_outage:
            self._in_outage = True
            with self._cond:
                waiting = self._acked_steps - self._committed_steps
            self.stats.add("spooled", waiting)
            if self._spool_error is None:
                where = f"in the spool {self.spool.directory}"
            else:
                where = "in memory, up to queue_bytes (the spool cannot be written)"
            log.warning(
                "klmon: database write failed (%s); steps wait %s and are written when it is back",
                msg,
                where,
            )
        elif isinstance(exc, SchemaOutOfDate) and self.last_error != msg:
            log.error("klmon: %s", msg)
        self.last_error = msg

    def _commit_some(self) -> None:
        if self.run_id is None:
            self.db_check()
            self.run_id = ensure_run(self.db, self.header)
            self._mark_running()
        self._commit_direct()
        while not self._abandon.is_set():
            seg, off = self._pos
            size, final = self.spool.segment_end(seg)
            if off >= size:
                if not final:
                    return
                self.spool.release(seg)
                self._pos = (seg + 1, len(FILE_MAGIC))
                continue
            path = self.spool.segment_path(seg)
            if path is None:  # pragma: no cover - released under us
                self._pos = (seg + 1, len(FILE_MAGIC))
                continue
            records, new_off = self._read_batch(path, off, size)
            steps = sum(1 for r in records if r.get("type") in ("step", "raw"))
            if records:
                result = apply_isolated(
                    self.db, self.run_id, self.header, records, self._dead_letter
                )
                if self._in_outage:
                    log.warning("klmon: database is back; replaying the spool")
                    self._in_outage = False
                    self._replaying_until = self.spool.end()
                self._count(result, steps, replayed=self._replaying_until is not None)
                if self._replaying_until is not None and (seg, new_off) >= self._replaying_until:
                    self._replaying_until = None
            with self._cond:
                self._pos = (seg, new_off)
                self._committed_steps += steps
                self._cond.notify_all()
            self._maybe_mark_commit(seg, new_off, steps)

    def _commit_direct(self) -> None:
        """Write the records the spool could not take, straight from memory."""
        with self._cond:
            records = [r for r, _ in self._direct]
        if not records:
            return
        assert self.run_id is not None
        result = apply_isolated(self.db, self.run_id, self.header, records, self._dead_letter)
        steps = sum(1 for r in records if r.get("type") in ("step", "raw"))
        self._count(result, steps, replayed=False)
        with self._cond:
            for _ in records:
                self._direct_bytes -= self._direct.popleft()[1]
            self._committed_steps += steps
            self._cond.notify_all()

    def db_check(self) -> None:
        # An empty database gets the schema; an older one is an error naming `klmon db
        # upgrade` while the steps wait in the spool.
        from monitor.store import ensure_schema

        with self.db.translate_errors():
            ensure_schema(self.db.engine)

    def _mark_running(self) -> None:
        assert self.run_id is not None
        from monitor.store import get_run

        info = get_run(self.db, self.run_id)
        if info.status != "running":  # a resumed run
            set_run_status(self.db, self.run_id, "running")

    def _read_batch(self, path: Any, off: int, size: int) -> tuple[list[dict[str, Any]], int]:
        records: list[dict[str, Any]] = []
        pos = off
        end = min(size, off + self.cfg.max_batch_bytes)
        for item in iter_records(path, start=off, end=end):
            if isinstance(item, SpoolRecord):
                records.append(item.record)
                pos = item.end
                if len(records) >= self.cfg.max_batch:
                    break
            elif isinstance(item, CorruptRecord):
                if item.end >= end and end < size:
                    break  # cut by the read window: read it whole next time
                self._skip_damaged(path, item)
                pos = item.end
        if pos == off and end < size:  # one record larger than the window: read it whole
            for item in iter_records(path, start=off, end=size):
                if isinstance(item, SpoolRecord):
                    records.append(item.record)
                else:  # damaged (or beyond what a reader accepts): skip it, never spin on it
                    self._skip_damaged(path, item)
                pos = item.end
                break
        return records, pos

    def _skip_damaged(self, path: Any, item: CorruptRecord) -> None:
        self.stats.add("corrupt")
        log.error(
            "klmon: damaged spool record at %s:%d (%s): skipped", path, item.offset, item.reason
        )

    def _count(self, result: ApplyResult, steps: int, *, replayed: bool) -> None:
        ing = result.ingest
        self.stats.add("rejected", result.raw_rejected)
        self.stats.add("written", ing.inserted)
        self.stats.add("duplicates", ing.duplicates)
        if ing.conflicts:
            self.stats.add("conflicts", len(ing.conflicts))
            log.warning(
                "klmon: step(s) %s already stored with a different payload: refused",
                ", ".join(map(str, ing.conflicts[:10])),
            )
        if replayed:
            self.stats.add("replayed", steps)

    def _maybe_mark_commit(self, seg: int, off: int, steps: int) -> None:
        """Note in the spool how far it is in the database, so ``klmon sync`` after a crash
        skips what is already stored (at most once a second, and only after real steps)."""
        now = time.monotonic()
        if steps and now - self._last_commit_mark >= 1.0:
            self._last_commit_mark = now
            with contextlib.suppress(OSError):
                self.spool.append({"type": "commit", "seg": seg, "upto": off})

    # flushing and stopping --------------------------------------------------------------------

    def pending(self) -> tuple[int, bool]:
        """(records not yet acknowledged, whether acknowledged records await the database)."""
        with self._cond:
            return self._submitted - self._acked, self._has_uncommitted()

    def wait(self, timeout: float, *, committed: bool = True) -> bool:
        """Wait until everything submitted is acknowledged (and, with ``committed``, written
        to the database). False if the timeout came first, or (``committed``) if a step was
        ever dropped or refused by the database: True means every logged step is stored."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while True:
                done = self._acked >= self._submitted and (
                    not committed or not self._has_uncommitted()
                )
                if done:
                    return not committed or self._lossless()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))

    def _lossless(self) -> bool:
        snap = self.stats.snapshot()
        return snap["dropped"] == 0 and snap["dead_letter"] == 0

    def _spool_written(self) -> bool:
        with self._cond:
            return self._acked >= self._submitted and not self._has_uncommitted()

    def committed_everything(self) -> bool:
        """Every logged step is in the database (none dropped or refused)."""
        return self._spool_written() and self._lossless()

    def stop(self, timeout: float) -> bool:
        """Drain (at most ``timeout`` seconds), stop both threads, close the spool: deleted if
        everything reached the database, else kept for replay. True if all was written."""
        deadline = time.monotonic() + max(timeout, 0.0)
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        with contextlib.suppress(queue.Full):
            self._queue.put((None, 0), timeout=max(deadline - time.monotonic(), 0.01))
        self._processor.join(max(deadline - time.monotonic(), 0.01))
        self.wait(max(deadline - time.monotonic(), 0.0))
        done = self._spool_written() and not self._processor.is_alive()
        self._abandon.set()
        with self._cond:
            self._cond.notify_all()
        self._committer.join(0.5 if done else 0.05)
        with self._cond:  # held in memory only (the spool failed): lost now
            lost = sum(1 for r, _ in self._direct if r.get("type") in ("step", "raw"))
            self._direct.clear()
            self._direct_bytes = 0
        if lost:
            self._drop(lost)
        with contextlib.suppress(OSError):
            self.spool.close(delete=done)
        self.db.dispose()
        return done and self._lossless()


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
    "STATS_KEYS",
    "ApplyResult",
    "BackgroundWriter",
    "ControlItem",
    "Stats",
    "StepItem",
    "WriterConfig",
    "apply_records",
    "ensure_run",
    "item_from_raw",
    "raw_record",
    "summarize_item",
    "to_step_record",
]
