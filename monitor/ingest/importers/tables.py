"""From a reader's records to klmon step rows, extra metrics and metric meanings.

Shared by every step-table format. A row's step comes from its step column (``--step-column``
or ``--map COLUMN=step``; else the first of :data:`STEP_KEYS` the log has; ``epoch`` only as
a last resort and only when every value is a whole number) or, when the log has none, its
position. Which one was used is said in the import summary.
Every numeric source key is kept as an extra metric under its own name; keys whose meaning
is known (or given with ``--map COLUMN=QUANTITY``) also fill klmon's step columns. Rows
for the same step are merged (a trainer_state eval row joins its training row).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from monitor.errors import InvalidInput
from monitor.ingest.importers.base import (
    NotNumeric,
    Problem,
    RawTable,
    to_number,
    to_step,
)
from monitor.ingest.importers.keys import (
    GENERIC,
    METRIC_PREFIX,
    QUANTITY_MEANINGS,
    KeyMeaning,
    base_key,
    detect_producer,
    is_int_quantity,
    lookup,
)
from monitor.ingest.text import clean_text
from monitor.store.metric_info import MetricInfo
from monitor.store.models import METRIC_NAME_MAX

STEP_KEYS: tuple[str, ...] = (
    "step",
    "global_step",
    "train/global_step",
    "trainer/global_step",
    "_step",
    "iteration",
    "iter",
    "update",
    "Step",
    "Iteration",
    "Update",
)
LAST_RESORT_STEP_KEYS: tuple[str, ...] = ("epoch", "train/epoch")
# klmon quantities that are a KL to the reference (what "the columns read as KL" lists).
KL_QUANTITIES: tuple[str, ...] = (
    "kl_mean",
    "kl_std",
    "kl_min",
    "kl_p05",
    "kl_p50",
    "kl_p95",
    "kl_max",
    "kl_p99",
    "k1",
    "k2",
    "k3",
)
# The unit of a KL value by the scale its meaning states.
UNITS: dict[str | None, str] = {
    "token-mean": "nats/token",
    "seq-mean": "nats/token (per-sequence mean)",
    "seq-sum": "nats/sequence",
    None: "unit not stated",
}
TIME_KEYS: tuple[str, ...] = ("wall_time", "_timestamp", "timestamp", "time")
STEP_STATUSES = ("ok", "partial", "rejected")


@dataclass
class Prepared:
    """Everything an import writes, built in memory before the first write."""

    fmt: str
    producer: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[tuple[int, str, float]] = field(default_factory=list)
    infos: list[MetricInfo] = field(default_factory=list)
    histograms: list[tuple[int, list[int]]] = field(default_factory=list)
    samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # quantity -> the source keys that filled it
    mapping: dict[str, list[str]] = field(default_factory=dict)
    records_read: int = 0
    # the step column and how it was chosen ("--step-column", "detected", ...); None: row order
    step_column: str | None = None
    step_source: str = "row order"
    # the columns read as KL: (column, quantity, estimator, unit)
    kl_read: list[tuple[str, str, str | None, str]] = field(default_factory=list)
    # columns named like a KL that fill nothing (when kl_read is empty)
    kl_candidates: list[str] = field(default_factory=list)

    def kl_lines(self) -> list[str]:
        """What the summary says about KL: the columns read as KL, or why none was."""
        if self.kl_read:
            shown = "; ".join(
                f"{c} -> {q} ({e or 'estimator not stated'}, {u})" for c, q, e, u in self.kl_read
            )
            return [f"KL read from: {shown}"]
        gap = self.mapping.get("rollout_gap")
        if gap:
            return [
                f"no KL to the reference recognised ({', '.join(gap)} read as rollout_gap, the "
                "sampler-vs-trainer gap); if a column is one, name it with --map COLUMN=k1 "
                "(or kl_mean, k3)"
            ]
        if self.kl_candidates:
            c = self.kl_candidates[0]
            return [
                "no KL column recognised, so no KL monitoring for this run; named like KL: "
                + ", ".join(self.kl_candidates[:8])
                + f". If {c} is a KL to the reference, import again with --map {c}=kl_mean "
                f"(a per-sequence sum) or --map {c}=k3 (a per-token mean of k3)"
            ]
        return [
            "no KL column recognised and none named like KL, so no KL monitoring for this "
            "run; name the KL column with --map COLUMN=kl_mean (or k1/k2/k3 per token)"
        ]


def merge(parts: list[Prepared]) -> Prepared:
    """One Prepared from the batches of one file (the in-memory view of a batched read)."""
    out = Prepared(fmt=parts[0].fmt, producer=parts[0].producer)
    for p in parts:
        out.steps.extend(p.steps)
        out.metrics.extend(p.metrics)
        out.problems.extend(p.problems)
        out.records_read += p.records_read
        out.notes.extend(n for n in p.notes if n not in out.notes)
        for q, cols in p.mapping.items():
            out.mapping.setdefault(q, []).extend(c for c in cols if c not in out.mapping.get(q, []))
        out.kl_read.extend(k for k in p.kl_read if k not in out.kl_read)
        known = {i.name for i in out.infos}
        out.infos.extend(i for i in p.infos if i.name not in known)
    first = parts[0]
    out.config, out.step_column, out.step_source = (
        first.config,
        first.step_column,
        first.step_source,
    )
    out.kl_candidates = [] if out.kl_read else first.kl_candidates
    return out


def payload_hash(row: dict[str, Any]) -> str:
    """A digest of what a step row holds (not its wall time): equal for a replayed import."""
    body = {k: v for k, v in row.items() if k not in ("wall_time", "payload_hash", "step")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_map_columns(user_map: dict[str, str | None], columns: set[str], path: object) -> None:
    """Every ``--map`` COLUMN must be a column of the file (a clear error otherwise)."""
    for column, quantity in user_map.items():
        if column in columns:
            continue
        close = difflib.get_close_matches(column, sorted(columns), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        shown = ", ".join(sorted(columns)[:30]) + (" ..." if len(columns) > 30 else "")
        raise InvalidInput(
            f"--map {column}={quantity or '-'}: {path} has no column {column!r}{hint} "
            f"(its columns: {shown})"
        )


def choose_step_column(
    table: RawTable,
    keys: set[str],
    user_map: dict[str, str | None],
    step_column: str | None,
    path: object,
) -> tuple[str | None, str]:
    """The step column and how it was chosen; removes a ``COLUMN=step`` entry from user_map."""
    mapped = [c for c, q in user_map.items() if q == "step"]
    if len(mapped) > 1 or (mapped and step_column and mapped[0] != step_column):
        raise InvalidInput(
            "one step column only: "
            + ", ".join(
                [*(f"--map {c}=step" for c in mapped)]
                + ([f"--step-column {step_column}"] if step_column else [])
            )
        )
    for c in mapped:
        del user_map[c]
    given = step_column or (mapped[0] if mapped else None)
    if given is not None:
        check_map_columns({given: "step"}, keys, path)
        how = "--step-column" if step_column else f"--map {given}=step"
        return given, how
    if table.step_key is not None:
        return table.step_key, table.step_source or "the format's"
    found = next((k for k in STEP_KEYS if k in keys), None)
    if found is not None:
        return found, "detected"
    for k in LAST_RESORT_STEP_KEYS:
        if k in keys and _whole_numbers(table, k):
            return k, "detected, last resort: no other step column"
    return None, "row order"


def _whole_numbers(table: RawTable, key: str) -> bool:
    seen = 0
    for rec in table.records:
        try:
            v = to_number(rec.values.get(key))
        except NotNumeric:
            return False
        if v is not None:
            if v != int(v) or v < 0:
                return False
            seen += 1
    return seen > 0


def build(
    table: RawTable,
    *,
    fmt: str,
    path: object,
    default_wall_time: float,
    user_map: dict[str, str | None] | None = None,
    step_column: str | None = None,
    row_offset: int = 0,
    producer: str | None = None,
) -> Prepared:
    """Steps, metrics and meanings from a reader's table.

    ``row_offset``: rows of the same file already built (a columnar file read in batches), so
    that row-order steps continue; ``producer``: fixed by the caller (from a file's schema)
    rather than detected from this table's keys.
    """
    user_map = dict(user_map or {})
    keys: set[str] = set()
    for rec in table.records:
        keys.update(rec.values)
    producer = producer or detect_producer(keys)
    out = Prepared(fmt=fmt, producer=producer, problems=list(table.problems))
    out.notes.extend(table.notes)
    out.records_read = len(table.records)
    klmon = producer == "klmon"
    step_key, out.step_source = choose_step_column(table, keys, user_map, step_column, path)
    out.step_column = step_key
    if step_key is None:
        out.notes.append(
            "no step column (step, global_step, trainer/global_step, _step, iteration, iter, "
            "update): row order used; name one with --step-column"
        )
    text_cols = {"status", "reject_reason"} if klmon else set()

    # 1. coerce values and merge rows by step
    merged: dict[int, dict[str, Any]] = {}
    names: dict[str, str] = {}  # source key -> a name any database stores
    non_numeric: Counter[str] = Counter()
    non_finite: Counter[str] = Counter()
    repeated = 0
    unit = "row" if fmt == "parquet" else "log_history entry" if fmt == "trainer_state" else "line"
    for index, rec in enumerate(table.records):
        if step_key is None:
            step = row_offset + index
        else:
            raw = rec.values.get(step_key)
            if raw is None or raw == "":
                shown = ", ".join(list(rec.values)[:5])
                out.problems.append(
                    Problem(
                        rec.line,
                        f"no {step_key!r} value (a row of another kind? keys: {shown})",
                        unit,
                    )
                )
                continue
            try:
                step = to_step(raw)
            except (ValueError, NotNumeric) as exc:
                out.problems.append(Problem(rec.line, f"bad step: {exc}", unit))
                continue
        values: dict[str, Any] = {}
        for k, v in rec.values.items():
            if k == step_key:
                continue
            name = names.get(k)
            if name is None:
                name = names[k] = clean_text(k)
            k = name
            if k in text_cols:
                values[k] = None if v is None or str(v).strip() == "" else str(v)
                continue
            try:
                values[k] = to_number(v)
            except NotNumeric:
                non_numeric[k] += 1
                continue
            if values[k] is None and v is not None and str(v).strip():
                non_finite[k] += 1  # NaN or +-inf: stored as missing, said below
        if not any(v is not None for v in values.values()):
            what = "only missing values" if values else "no numeric values"
            shown = ", ".join(list(rec.values)[:5])
            out.problems.append(
                Problem(rec.line, f"a row of another kind ({what}; keys: {shown})", unit)
            )
            continue
        slot = merged.setdefault(step, {})
        if any(k in slot and slot[k] != v for k, v in values.items()):
            repeated += 1
        slot.update(values)
    if repeated:
        out.notes.append(f"{repeated} rows repeated a step already seen: the later values kept")
    if non_numeric:
        cols = ", ".join(f"{k} ({n})" for k, n in non_numeric.most_common(5))
        out.notes.append(f"non-numeric values ignored in: {cols}")
    if non_finite:
        cols = ", ".join(f"{k} ({n})" for k, n in non_finite.most_common(5))
        out.notes.append(f"NaN or infinite values stored as missing in: {cols}")

    # 2. what each column means
    columns = {k for vals in merged.values() for k in vals}
    too_long = sorted(c for c in columns if len(c) > METRIC_NAME_MAX)
    if too_long:
        out.notes.append(
            f"{len(too_long)} columns with names over {METRIC_NAME_MAX} characters not stored: "
            f"{too_long[0][:60]}..."
        )
        columns -= set(too_long)
        for vals in merged.values():
            for c in too_long:
                vals.pop(c, None)
    check_map_columns(user_map, columns | keys - {step_key}, path)
    meanings: dict[str, KeyMeaning | None] = {c: lookup(producer, c) for c in columns}
    for column, quantity in user_map.items():
        base = meanings.get(column)
        if quantity is None:
            meanings[column] = KeyMeaning(
                None,
                base.estimator if base else None,
                base.scale if base else None,
                f"--map {column}=-: kept only as a metric"
                + (f" ({base.description})" if base and base.description else ""),
            )
        else:
            q = QUANTITY_MEANINGS[quantity]
            meanings[column] = KeyMeaning(
                quantity,
                q.estimator,
                q.scale,
                f"mapped with --map {column}={quantity}: {q.description}",
                priority=-10,
            )
    candidates: dict[str, list[tuple[int, str]]] = {}
    for column, m in meanings.items():
        if m is not None and m.quantity is not None:
            candidates.setdefault(m.quantity, []).append((m.priority, column))
    for cands in candidates.values():
        cands.sort()

    # 3. step rows and metrics
    used: dict[str, Counter[str]] = {}
    time_key = next((k for k in TIME_KEYS if k in columns), None) if not klmon else None
    for step in sorted(merged):
        vals = merged[step]
        row: dict[str, Any] = {"step": step}
        for quantity, cands in candidates.items():
            for _prio, column in cands:
                v = vals.get(column)
                if v is not None:
                    if is_int_quantity(quantity):
                        if abs(v) >= 2**31:
                            continue  # beyond the column's range: kept as a metric only
                        v = round(v)
                    row[quantity] = v
                    used.setdefault(quantity, Counter())[column] += 1
                    break
        if klmon:
            status = vals.get("status")
            if status is not None:
                if status not in STEP_STATUSES:
                    out.problems.append(Problem(step, f"unknown status {status!r}", "step"))
                    continue
                if vals.get("wall_time") is None:
                    out.problems.append(Problem(step, "a step row without wall_time", "step"))
                    continue
                row["wall_time"] = vals["wall_time"]
                row["status"] = status
                row["reject_reason"] = vals.get("reject_reason")
                if vals.get("ranks_seen") is not None:
                    row["ranks_seen"] = int(vals["ranks_seen"])
                row["payload_hash"] = payload_hash(row)
                out.steps.append(row)
        else:
            row["wall_time"] = _wall_time(vals.get(time_key), default_wall_time)
            row["payload_hash"] = payload_hash(row)
            out.steps.append(row)
        for column, v in vals.items():
            m = meanings.get(column)
            if v is None or (m is not None and not m.keep_metric):
                continue
            name = (
                column[len(METRIC_PREFIX) :]
                if klmon and column.startswith(METRIC_PREFIX)
                else column
            )
            out.metrics.append((step, name, v))

    out.mapping = {
        q: [c for c, _n in used[q].most_common()] for q in QUANTITY_MEANINGS if q in used
    }
    for q in KL_QUANTITIES:
        for column in out.mapping.get(q, []):
            m = meanings[column]
            assert m is not None
            out.kl_read.append((column, q, m.estimator, UNITS.get(m.scale, m.scale or "")))
    if not out.kl_read:
        # a column a producer's table describes (old-vs-new, sampler-vs-trainer) is not one
        out.kl_candidates = sorted(
            c
            for c in columns
            if _named_like_kl(c)
            and (meanings.get(c) is None or meanings[c] is GENERIC.get(base_key(c)))
        )
    stored = {name for _s, name, _v in out.metrics}
    source = producer if producer not in ("generic", "klmon") else fmt
    if klmon:
        exported = table.config.get("klmon_export", {}).get("metric_info", [])
        out.infos = [MetricInfo(**i) for i in exported if i.get("name") in stored]
    else:
        for column in sorted(stored):
            m = meanings.get(column)
            out.infos.append(
                MetricInfo(
                    name=column,
                    source=source,
                    quantity=m.quantity if m else None,
                    estimator=m.estimator if m else None,
                    scale=m.scale if m else None,
                    description=m.description if m else None,
                )
            )
    out.config = {k: v for k, v in table.config.items() if k != "klmon_export"}
    if klmon and "config" in table.config.get("klmon_export", {}):
        out.config = dict(table.config["klmon_export"]["config"])
    return out


def _named_like_kl(column: str) -> bool:
    """``kl``, ``kl_vs_ref``, ``objective/kl``, ``approx_kl``, ``KL``: not ``kl_coef``."""
    words = [w for w in re.split(r"[^a-z0-9]+", column.lower()) if w]
    return any(w in ("kl", "approxkl", "policykl") for w in words) and not any(
        w in ("coef", "coeff", "beta", "ctl", "target") for w in words
    )


def _wall_time(value: float | None, default: float) -> float:
    """A timestamp column in Unix seconds (or milliseconds), else the default."""
    if value is None:
        return default
    if value > 1e11:  # milliseconds
        value = value / 1000.0
    return value if 1e8 < value < 1e10 else default
