"""What people ask of alerts (the dashboard and ``klmon alerts``): episodes, acknowledgements,
silences and rule states."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import func, select

from monitor.errors import InvalidInput, NotFound
from monitor.store.alerts.domain import (
    EVENT_COLUMNS,
    EVENT_STATES,
    SEVERITIES,
    AlertEvent,
    Silence,
    event_from_row,
    silence_from_row,
)
from monitor.store.database import Database
from monitor.store.models import (
    AlertCursorRow,
    AlertEventRow,
    AlertSilenceRow,
    AlertStateRow,
    RunRow,
)

# --------------------------------------------------------------------------- dashboard API


def open_event_counts(db: Database) -> dict[int, int]:
    """How many pending or firing episodes each run has (runs without any are absent)."""
    q = (
        select(AlertEventRow.run_id, func.count())
        .where(AlertEventRow.state.in_(("pending", "firing")))
        .group_by(AlertEventRow.run_id)
    )
    with db.session() as s:
        return {int(run_id): int(n) for run_id, n in s.execute(q).all()}


def event_markers(db: Database, run_ids: Sequence[int], limit: int) -> pd.DataFrame:
    """The runs' latest ``limit`` episodes, newest first, lean enough for every chart
    render. Columns: run_id, step (where it fired, else went pending), rule, severity,
    state, message."""
    columns = ["run_id", "step", "rule", "severity", "state", "message"]
    ids = [int(r) for r in run_ids]
    if not ids:
        return pd.DataFrame(columns=columns)
    e = AlertEventRow
    q = (
        select(
            e.run_id, func.coalesce(e.fired_step, e.start_step), e.rule, e.severity, e.state,
            e.message,
        )
        .where(e.run_id.in_(ids))
        .order_by(e.id.desc())
        .limit(int(limit))
    )  # fmt: skip
    with db.session() as s:
        rows = s.execute(q).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=columns)


def list_events(
    db: Database,
    *,
    run_id: int | Sequence[int] | None = None,
    state: str | Sequence[str] | None = None,
    rule: str | None = None,
    severity: str | None = None,
    since: float | None = None,
    limit: int | None = 1000,
    now: float | None = None,
) -> pd.DataFrame:
    """Alert episodes, newest first, as a DataFrame with the columns of ``EVENT_COLUMNS``:

    id, run_id, project, run_name, rule, detector, severity, state (pending | firing |
    resolved), rule_state (the (run, rule) state now for an open episode: pending | firing |
    nodata; None once resolved), start_step (went pending), fired_step, end_step (resolved),
    last_step (condition last held), value and threshold (at firing), last_value,
    peak_value and peak_step (the episode's highest level, e.g. the KL, and where), message,
    causes (list of str), started_at, fired_at, resolved_at, acknowledged_at,
    acknowledged_by, notified_firing, notified_resolved, silenced (a silence covers it now).

    ``state`` also accepts ``"open"`` (pending or firing). ``since``: episodes started at or
    after this Unix time.
    """
    now = time.time() if now is None else now
    q = (
        select(AlertEventRow, RunRow.project, RunRow.name, AlertStateRow.state)
        .join(RunRow, RunRow.id == AlertEventRow.run_id)
        .outerjoin(AlertStateRow, AlertStateRow.event_id == AlertEventRow.id)
        .order_by(AlertEventRow.id.desc())
    )
    if run_id is not None:
        ids = [run_id] if isinstance(run_id, int) else list(run_id)
        q = q.where(AlertEventRow.run_id.in_(ids))
    if state is not None:
        wanted = [state] if isinstance(state, str) else list(state)
        if "open" in wanted:
            wanted = [w for w in wanted if w != "open"] + ["pending", "firing"]
        bad = set(wanted) - set(EVENT_STATES)
        if bad:
            raise InvalidInput(
                f"state {sorted(bad)} is not one of {', '.join(EVENT_STATES)} or open"
            )
        q = q.where(AlertEventRow.state.in_(wanted))
    if rule is not None:
        q = q.where(AlertEventRow.rule == rule)
    if severity is not None:
        if severity not in SEVERITIES:
            raise InvalidInput(f"severity {severity!r} is not one of {', '.join(SEVERITIES)}")
        q = q.where(AlertEventRow.severity == severity)
    if since is not None:
        q = q.where(AlertEventRow.started_at >= since)
    if limit is not None:
        q = q.limit(int(limit))
    with db.session() as s:
        rows = s.execute(q).all()
        silences = _active_silences(s, now)
    records = []
    for ev_row, project, run_name, rule_state in rows:
        ev = event_from_row(ev_row)
        rec = {c: getattr(ev, c) for c in EVENT_COLUMNS if hasattr(ev, c)}
        rec["causes"] = list(ev.causes)
        rec["project"] = project
        rec["run_name"] = run_name
        rec["rule_state"] = rule_state if ev.state != "resolved" else None
        rec["silenced"] = any(si.covers(ev.run_id, ev.rule, now) for si in silences)
        records.append(rec)
    df = pd.DataFrame(records, columns=list(EVENT_COLUMNS))
    for c in ("start_step", "fired_step", "end_step", "last_step", "peak_step"):
        df[c] = df[c].astype("Int64")
    for c in ("value", "threshold", "last_value", "peak_value"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return df


def acknowledge_event(
    db: Database, event_id: int, by: str, *, now: float | None = None
) -> AlertEvent:
    """Mark an episode acknowledged by ``by`` (a name or email). Acknowledging twice keeps
    the first acknowledgement."""
    by = (by or "").strip()
    if not by:
        raise InvalidInput("acknowledge_event: 'by' must name who acknowledges")
    if len(by) > 200:
        raise InvalidInput("acknowledge_event: 'by' is longer than 200 characters")
    now = time.time() if now is None else now
    with db.session() as s:
        row = s.get(AlertEventRow, int(event_id))
        if row is None:
            raise NotFound(f"alert event {event_id} does not exist")
        if row.acknowledged_at is None:
            row.acknowledged_at = now
            row.acknowledged_by = by
            s.flush()
        return event_from_row(row)


def silence(
    db: Database,
    run_id: int,
    rule: str | None,
    until: float,
    *,
    by: str | None = None,
    reason: str | None = None,
    now: float | None = None,
) -> Silence:
    """Suppress notifications for a run (every rule when ``rule`` is None) until the Unix
    time ``until``. States are still tracked; a still-firing alert is announced when the
    silence ends."""
    now = time.time() if now is None else now
    if not until > now:
        raise InvalidInput("silence: 'until' must be in the future")
    if rule is not None and (not rule.strip() or len(rule) > 100):
        raise InvalidInput("silence: rule must be a non-empty name of at most 100 characters")
    with db.session() as s:
        if s.get(RunRow, int(run_id)) is None:
            raise NotFound(f"run {run_id} does not exist")
        row = AlertSilenceRow(
            run_id=int(run_id),
            rule=rule,
            until=float(until),
            created_at=now,
            created_by=(by or None) and by[:200],
            reason=reason,
        )
        s.add(row)
        s.flush()
        return silence_from_row(row)


def unsilence(db: Database, silence_id: int, *, now: float | None = None) -> Silence:
    """End a silence now (the record is kept)."""
    now = time.time() if now is None else now
    with db.session() as s:
        row = s.get(AlertSilenceRow, int(silence_id))
        if row is None:
            raise NotFound(f"silence {silence_id} does not exist")
        row.until = min(row.until, now)
        s.flush()
        return silence_from_row(row)


def _active_silences(s: Any, now: float) -> list[Silence]:
    return [
        silence_from_row(r)
        for r in s.scalars(select(AlertSilenceRow).where(AlertSilenceRow.until > now)).all()
    ]


def active_silences(db: Database, now: float | None = None) -> list[Silence]:
    now = time.time() if now is None else now
    with db.session() as s:
        return _active_silences(s, now)


def list_silences(
    db: Database,
    *,
    run_id: int | None = None,
    active_only: bool = False,
    now: float | None = None,
) -> pd.DataFrame:
    """Silences, newest first: id, run_id, project, run_name, rule (None: every rule),
    until, created_at, created_by, reason, active."""
    now = time.time() if now is None else now
    q = (
        select(AlertSilenceRow, RunRow.project, RunRow.name)
        .join(RunRow, RunRow.id == AlertSilenceRow.run_id)
        .order_by(AlertSilenceRow.id.desc())
    )
    if run_id is not None:
        q = q.where(AlertSilenceRow.run_id == run_id)
    if active_only:
        q = q.where(AlertSilenceRow.until > now)
    with db.session() as s:
        rows = s.execute(q).all()
    cols = [
        "id", "run_id", "project", "run_name", "rule", "until", "created_at", "created_by",
        "reason", "active",
    ]  # fmt: skip
    return pd.DataFrame(
        [
            {
                "id": r.id,
                "run_id": r.run_id,
                "project": project,
                "run_name": name,
                "rule": r.rule,
                "until": r.until,
                "created_at": r.created_at,
                "created_by": r.created_by,
                "reason": r.reason,
                "active": r.until > now,
            }
            for r, project, name in rows
        ],
        columns=cols,
    )


def list_rule_states(db: Database, run_id: int | None = None) -> pd.DataFrame:
    """Where each (run, rule) stands: run_id, rule, state (ok | pending | firing | nodata),
    hold_steps, clear_steps, since_step, event_id, updated_at."""
    q = select(AlertStateRow).order_by(AlertStateRow.run_id, AlertStateRow.rule)
    if run_id is not None:
        q = q.where(AlertStateRow.run_id == run_id)
    cols = [
        "run_id", "rule", "state", "hold_steps", "clear_steps", "since_step", "event_id",
        "updated_at",
    ]  # fmt: skip
    with db.session() as s:
        rows = s.scalars(q).all()
        return pd.DataFrame([{c: getattr(r, c) for c in cols} for r in rows], columns=cols)


def evaluation_cursor(db: Database, run_id: int) -> int | None:
    """The last step the alert engine evaluated for a run (None: never)."""
    with db.session() as s:
        return s.scalar(select(AlertCursorRow.last_step).where(AlertCursorRow.run_id == run_id))
