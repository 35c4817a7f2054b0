"""Spool records -> database, shared by the live committer and ``klmon sync``: a batch of one
run's records (steps, raw spilled steps summarised here, metrics, a status) written in one
transaction, and the isolated variant that retries a refused batch one record at a time and
sends each record the database refuses to a dead letter instead of stopping the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from monitor.errors import DatabaseUnavailable, SchemaOutOfDate
from monitor.ingest.records import (
    WriterConfig,
    config_from_header,
    item_from_raw,
    raw_config,
    summarize_item,
)
from monitor.ingest.text import clean_json, clean_optional, clean_strings, clean_text
from monitor.store import (
    STEP_QUANTITIES,
    Database,
    IngestResult,
    SampleRetention,
    StepRecord,
    get_or_create_run,
    set_run_status,
    write_metric_records,
    write_step_records,
)


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
        ledger=rec.get("ledger"),
        vocab=rec.get("vocab") or (),
    )


def _clean_sample(sample: Mapping[str, Any]) -> Mapping[str, Any]:
    """A sample whose texts and token strings both databases can store. A sample with its
    ``payload`` was cleaned and encoded by the processor (``records.select_samples``); one
    with arrays and strings (a spool written by klmon before payloads) is cleaned here (see
    ``monitor.ingest.text``) and encoded by the store."""
    if "payload" in sample:
        return sample
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
    cfg: WriterConfig | None = None,
) -> ApplyResult:
    """Write spool records of one run (steps, metrics, status) to the database. ``cfg``: the
    live writer's settings (its vocabulary) for the raw steps summarised here; ``klmon sync``
    reads them from the spool header."""
    out = ApplyResult()
    world_size = int(header.get("world_size") or 1)
    quantities = header.get("quantities")
    steps: list[StepRecord] = []
    metric_groups: list[tuple[int, list[tuple[str, float | None]]]] = []
    status: tuple[str, float] | None = None
    for rec in records:
        kind = rec.get("type")
        if kind == "raw":  # spilled by log_step: summarise it now
            raw_cfg = raw_config(rec, cfg or config_from_header(header))
            rec = summarize_item(item_from_raw(rec), header, raw_cfg)
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
        out.ingest = write_step_records(
            db,
            run_id,
            steps,
            world_size=world_size,
            seen_at=seen_at,
            retention=SampleRetention.coerce(header.get("sample_retention")),
        )
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
    cfg: WriterConfig | None = None,
) -> ApplyResult:
    """:func:`apply_records`, where a record the database refuses is that record's problem:
    the batch is retried one record at a time, each refused one goes to ``dead_letter`` and
    the rest is written. An unreachable database (DatabaseUnavailable, SchemaOutOfDate)
    still raises: then nothing is wrong with the records, and they are retried later."""
    try:
        return apply_records(db, run_id, header, records, cfg=cfg)
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
            one = apply_records(db, run_id, header, [rec], cfg=cfg)
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


__all__ = [
    "ApplyResult",
    "DeadLetter",
    "apply_isolated",
    "apply_records",
    "ensure_run",
    "to_step_record",
]
