"""Alert state in the database: per-run cursors, per-(run, rule) states, episodes (events),
silences and the notification outbox. Returns domain objects and DataFrames, never ORM rows.

The dashboard calls ``list_events``, ``acknowledge_event``, ``silence``, ``unsilence`` and
``list_silences``; the alert engine (monitor.alerts) calls the rest.

Concurrency: an evaluation is committed with a compare-and-set on the run's cursor version
(``commit_evaluation`` returns False when another evaluator got there first), a notification
is enqueued with a compare-and-set on the events' ``notified_*`` flags, and an outbox row is
claimed with a lease (``claimed_by``, ``claimed_until``) before it is sent. Two engines on
one database therefore never record the same transition twice nor send the same
notification twice at once; a notification is sent again only when its claimer died
between the channel's accept and ``mark_sent`` (at least once, with the same Message-ID /
Idempotency-Key).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy import and_, delete, func, or_, select, text, true, update
from sqlalchemy.exc import IntegrityError

from monitor.errors import InvalidInput, NotFound, StoreError
from monitor.store.database import Database
from monitor.store.models import (
    AlertCursorRow,
    AlertEventRow,
    AlertNotificationRow,
    AlertSilenceRow,
    AlertStateRow,
    RunRow,
    StepRow,
)
from monitor.store.steps import read_steps

EVENT_STATES = ("pending", "firing", "resolved")
RULE_STATES = ("ok", "pending", "firing", "nodata")
SEVERITIES = ("info", "warning", "critical")

EVENT_COLUMNS = (
    "id",
    "run_id",
    "project",
    "run_name",
    "rule",
    "detector",
    "severity",
    "state",
    "rule_state",
    "start_step",
    "fired_step",
    "end_step",
    "last_step",
    "value",
    "threshold",
    "last_value",
    "peak_value",
    "peak_step",
    "message",
    "causes",
    "started_at",
    "fired_at",
    "resolved_at",
    "acknowledged_at",
    "acknowledged_by",
    "notified_firing",
    "notified_resolved",
    "silenced",
)


# --------------------------------------------------------------------------- domain objects


@dataclass(frozen=True)
class AlertEvent:
    """One episode of a rule on a run, as stored. ``start_step`` is where it went pending,
    ``fired_step`` where it fired, ``end_step`` where it resolved."""

    id: int
    run_id: int
    rule: str
    detector: str
    severity: str
    state: str
    start_step: int
    fired_step: int | None
    end_step: int | None
    last_step: int | None
    value: float | None
    threshold: float | None
    last_value: float | None
    message: str
    causes: tuple[str, ...]
    started_at: float
    fired_at: float | None
    resolved_at: float | None
    acknowledged_at: float | None
    acknowledged_by: str | None
    notified_firing: bool
    notified_resolved: bool
    peak_value: float | None = None
    peak_step: int | None = None
    escalated_step: int | None = None
    escalation_notified_step: int | None = None

    @property
    def escalation_owed(self) -> bool:
        """Escalated past what its notifications announced."""
        return self.escalated_step is not None and (
            self.escalation_notified_step is None
            or self.escalated_step > self.escalation_notified_step
        )


@dataclass
class EventDraft:
    """The engine's working copy of an episode; ``id`` is None until it is inserted."""

    run_id: int
    rule: str
    detector: str
    severity: str
    state: str
    start_step: int
    message: str
    started_at: float
    value: float | None = None
    threshold: float | None = None
    causes: tuple[str, ...] = ()
    fired_step: int | None = None
    end_step: int | None = None
    last_step: int | None = None
    last_value: float | None = None
    fired_at: float | None = None
    resolved_at: float | None = None
    peak_value: float | None = None
    peak_step: int | None = None
    escalate_at: float | None = None
    escalated_step: int | None = None
    id: int | None = None
    deleted: bool = False


@dataclass
class RuleStateDraft:
    """Where a (run, rule) stands: ok | pending | firing | nodata, and the consecutive steps
    the condition has held (pending) or been clear (firing)."""

    rule: str
    state: str = "ok"
    hold_steps: int = 0
    clear_steps: int = 0
    since_step: int | None = None
    event: EventDraft | None = None
    cooldown_left: int = 0


@dataclass(frozen=True)
class RunToEvaluate:
    """A run with its evaluation cursor: ``cursor`` is the last evaluated step (None: never),
    ``version`` the cursor's compare-and-set version (-1: no cursor row yet)."""

    id: int
    project: str
    name: str
    status: str
    source: str
    last_seen_at: float
    config: dict[str, Any]
    cursor: int | None
    version: int
    max_step: int | None
    has_open: bool = False

    @property
    def has_new_steps(self) -> bool:
        return self.max_step is not None and (self.cursor is None or self.max_step > self.cursor)


@dataclass(frozen=True)
class Silence:
    id: int
    run_id: int
    rule: str | None
    until: float
    created_at: float
    created_by: str | None
    reason: str | None

    def covers(self, run_id: int, rule: str, now: float) -> bool:
        if self.run_id != run_id or now >= self.until:
            return False
        return self.rule is None or self.rule == rule


@dataclass(frozen=True)
class Notification:
    """An outbox row."""

    id: int
    run_id: int | None
    channel: str
    subject: str
    payload: dict[str, Any]
    event_ids: tuple[int, ...]
    status: str
    attempts: int
    created_at: float
    next_attempt_at: float
    sent_at: float | None
    last_error: str | None
    claimed_by: str | None = None


@dataclass
class OutgoingMessage:
    """A rendered notification to enqueue on one channel."""

    channel: str
    subject: str
    payload: dict[str, Any] = field(default_factory=dict)


class _LostRace(Exception):
    """Another evaluator advanced the cursor (or flagged the events) first."""


# --------------------------------------------------------------------------- converters


def _event(row: AlertEventRow) -> AlertEvent:
    return AlertEvent(
        id=row.id,
        run_id=row.run_id,
        rule=row.rule,
        detector=row.detector,
        severity=row.severity,
        state=row.state,
        start_step=int(row.start_step),
        fired_step=None if row.fired_step is None else int(row.fired_step),
        end_step=None if row.end_step is None else int(row.end_step),
        last_step=None if row.last_step is None else int(row.last_step),
        value=row.value,
        threshold=row.threshold,
        last_value=row.last_value,
        message=row.message,
        causes=tuple(row.causes or ()),
        started_at=row.started_at,
        fired_at=row.fired_at,
        resolved_at=row.resolved_at,
        acknowledged_at=row.acknowledged_at,
        acknowledged_by=row.acknowledged_by,
        notified_firing=bool(row.notified_firing),
        notified_resolved=bool(row.notified_resolved),
        peak_value=row.peak_value,
        peak_step=None if row.peak_step is None else int(row.peak_step),
        escalated_step=None if row.escalated_step is None else int(row.escalated_step),
        escalation_notified_step=(
            None if row.escalation_notified_step is None else int(row.escalation_notified_step)
        ),
    )


def _draft(row: AlertEventRow) -> EventDraft:
    return EventDraft(
        id=row.id,
        run_id=row.run_id,
        rule=row.rule,
        detector=row.detector,
        severity=row.severity,
        state=row.state,
        start_step=int(row.start_step),
        message=row.message,
        started_at=row.started_at,
        value=row.value,
        threshold=row.threshold,
        causes=tuple(row.causes or ()),
        fired_step=row.fired_step,
        end_step=row.end_step,
        last_step=row.last_step,
        last_value=row.last_value,
        fired_at=row.fired_at,
        resolved_at=row.resolved_at,
        peak_value=row.peak_value,
        peak_step=row.peak_step,
        escalate_at=row.escalate_at,
        escalated_step=row.escalated_step,
    )


def _silence(row: AlertSilenceRow) -> Silence:
    return Silence(
        row.id, row.run_id, row.rule, row.until, row.created_at, row.created_by, row.reason
    )


def _notification(row: AlertNotificationRow) -> Notification:
    return Notification(
        id=row.id,
        run_id=row.run_id,
        channel=row.channel,
        subject=row.subject,
        payload=dict(row.payload or {}),
        event_ids=tuple(int(i) for i in row.event_ids or ()),
        status=row.status,
        attempts=row.attempts,
        created_at=row.created_at,
        next_attempt_at=row.next_attempt_at,
        sent_at=row.sent_at,
        last_error=row.last_error,
        claimed_by=row.claimed_by,
    )


# --------------------------------------------------------------------------- evaluation


def runs_to_evaluate(db: Database, run_ids: Sequence[int] | None = None) -> list[RunToEvaluate]:
    """Every run (or those of ``run_ids``) with its cursor and its highest stored step.

    The highest step is one index lookup per run (the steps primary key), so this costs the
    same whether a run has 1k or 10M steps.
    """
    max_step = select(func.max(StepRow.step)).where(StepRow.run_id == RunRow.id).scalar_subquery()
    has_open = (
        select(AlertStateRow.rule)
        .where(AlertStateRow.run_id == RunRow.id, AlertStateRow.state != "ok")
        .exists()
    )
    q = (
        select(RunRow, AlertCursorRow.last_step, AlertCursorRow.version, max_step, has_open)
        .outerjoin(AlertCursorRow, AlertCursorRow.run_id == RunRow.id)
        .order_by(RunRow.id)
    )
    if run_ids is not None:
        q = q.where(RunRow.id.in_(list(run_ids)))
    with db.session() as s:
        rows = s.execute(q).all()
        return [
            RunToEvaluate(
                id=r.id,
                project=r.project,
                name=r.name,
                status=r.status,
                source=r.source,
                last_seen_at=r.last_seen_at,
                config=dict(r.config or {}),
                cursor=None if cursor is None else int(cursor),
                version=-1 if version is None else int(version),
                max_step=None if top is None else int(top),
                has_open=bool(open_),
            )
            for r, cursor, version, top, open_ in rows
        ]


def step_wall_time(db: Database, run_id: int, step: int) -> float | None:
    with db.session() as s:
        return s.scalar(
            select(StepRow.wall_time).where(StepRow.run_id == run_id, StepRow.step == step)
        )


def _nth_step(
    db: Database, run_id: int, *, before_or_at: int | None, after: int | None, n: int
) -> int | None:
    """The n-th step (1-based) counting back from ``before_or_at`` or forward from ``after``."""
    if n < 1:
        return None
    with db.begin() as conn:
        if before_or_at is not None:
            sql = text(
                "SELECT step FROM steps WHERE run_id = :run AND step <= :at "
                "ORDER BY step DESC LIMIT 1 OFFSET :off"
            )
            params = {"run": run_id, "at": int(before_or_at), "off": n - 1}
        else:
            where = "" if after is None else " AND step > :after"
            sql = text(
                f"SELECT step FROM steps WHERE run_id = :run{where} "
                "ORDER BY step LIMIT 1 OFFSET :off"
            )
            params = {"run": run_id, "off": n - 1}
            if after is not None:
                params["after"] = int(after)
        value = conn.execute(sql, params).scalar()
    return None if value is None else int(value)


def read_evaluation_window(
    db: Database,
    run_id: int,
    *,
    after: int | None,
    lookback_rows: int | None,
    head_rows: int = 0,
    max_new_rows: int | None = None,
) -> pd.DataFrame:
    """The step rows an incremental evaluation needs, sorted by step: up to
    ``max_new_rows`` steps after ``after``, the ``lookback_rows`` rows at or before it
    (None: the whole history), and the run's first ``head_rows`` rows (detectors whose
    baseline is the warm-up). A short run is read whole."""
    end = None
    if max_new_rows is not None:
        end = _nth_step(db, run_id, before_or_at=None, after=after, n=max_new_rows)
    if after is None or lookback_rows is None:
        return read_steps(db, run_id, end=end)
    if lookback_rows <= 0:
        start: int | None = after + 1
    else:  # None when there are fewer rows than that: read from the first step
        start = _nth_step(db, run_id, before_or_at=after, after=None, n=lookback_rows)
    if start is None:
        return read_steps(db, run_id, end=end)
    if head_rows > 0:
        head_end = _nth_step(db, run_id, before_or_at=None, after=None, n=head_rows)
        if head_end is None or head_end >= start - 1:
            return read_steps(db, run_id, end=end)
        head = read_steps(db, run_id, end=head_end)
        tail = read_steps(db, run_id, start=start, end=end)
        return pd.concat([head, tail], ignore_index=True)
    return read_steps(db, run_id, start=start, end=end)


def read_steps_around(
    db: Database, run_id: int, step: int, *, before_rows: int = 150, after_rows: int = 20
) -> pd.DataFrame:
    """About ``before_rows`` rows up to ``step`` and ``after_rows`` after it (for a chart)."""
    start = _nth_step(db, run_id, before_or_at=step, after=None, n=before_rows)
    end = _nth_step(db, run_id, before_or_at=None, after=step, n=after_rows)
    return read_steps(db, run_id, start=start, end=end)


def load_rule_states(db: Database, run_id: int) -> dict[str, RuleStateDraft]:
    """The stored states of a run's rules, with their open episodes as drafts."""
    with db.session() as s:
        rows = s.execute(
            select(AlertStateRow, AlertEventRow)
            .outerjoin(AlertEventRow, AlertEventRow.id == AlertStateRow.event_id)
            .where(AlertStateRow.run_id == run_id)
        ).all()
        return {
            st.rule: RuleStateDraft(
                rule=st.rule,
                state=st.state,
                hold_steps=st.hold_steps,
                clear_steps=st.clear_steps,
                since_step=st.since_step,
                event=_draft(ev) if ev is not None else None,
                cooldown_left=st.cooldown_left or 0,
            )
            for st, ev in rows
        }


def commit_evaluation(
    db: Database,
    run: RunToEvaluate,
    *,
    last_step: int | None,
    states: Iterable[RuleStateDraft],
    events: Iterable[EventDraft],
    now: float,
) -> bool:
    """Store an evaluation of ``run`` atomically: the episodes it created, changed or
    cancelled, the rule states, and the cursor advanced to ``last_step``.

    Returns False (and stores nothing) when the cursor moved since ``run`` was read: another
    evaluator recorded these steps already.
    """
    try:
        with db.session() as s:
            _advance_cursor(s, run, last_step, now)
            for ev in events:
                if ev.deleted:
                    if ev.id is not None:
                        s.execute(delete(AlertEventRow).where(AlertEventRow.id == ev.id))
                    continue
                values = {
                    "run_id": ev.run_id,
                    "rule": ev.rule,
                    "detector": ev.detector,
                    "severity": ev.severity,
                    "state": ev.state,
                    "start_step": int(ev.start_step),
                    "fired_step": ev.fired_step,
                    "end_step": ev.end_step,
                    "last_step": ev.last_step,
                    "value": _finite(ev.value),
                    "threshold": _finite(ev.threshold),
                    "last_value": _finite(ev.last_value),
                    "message": ev.message,
                    "causes": list(ev.causes),
                    "started_at": ev.started_at,
                    "fired_at": ev.fired_at,
                    "resolved_at": ev.resolved_at,
                    "peak_value": _finite(ev.peak_value),
                    "peak_step": ev.peak_step,
                    "escalate_at": _finite(ev.escalate_at),
                    "escalated_step": ev.escalated_step,
                }
                if ev.id is None:
                    row = AlertEventRow(**values, notified_firing=False, notified_resolved=False)
                    s.add(row)
                    s.flush()
                    ev.id = row.id
                else:
                    s.execute(
                        update(AlertEventRow).where(AlertEventRow.id == ev.id).values(**values)
                    )
            for st in states:
                event_id = None
                if st.event is not None and not st.event.deleted:
                    event_id = st.event.id
                values = {
                    "state": st.state,
                    "hold_steps": st.hold_steps,
                    "clear_steps": st.clear_steps,
                    "event_id": event_id,
                    "since_step": st.since_step,
                    "updated_at": now,
                    "cooldown_left": st.cooldown_left,
                }
                found = s.execute(
                    update(AlertStateRow)
                    .where(AlertStateRow.run_id == run.id, AlertStateRow.rule == st.rule)
                    .values(**values)
                ).rowcount
                if not found:
                    s.add(AlertStateRow(run_id=run.id, rule=st.rule, **values))
            s.flush()
    except _LostRace:
        return False
    except StoreError as exc:
        if isinstance(exc.__cause__, IntegrityError):
            return False  # a concurrent first evaluation inserted the cursor row
        raise
    return True


def _advance_cursor(s: Any, run: RunToEvaluate, last_step: int | None, now: float) -> None:
    if run.version < 0:
        s.add(AlertCursorRow(run_id=run.id, last_step=last_step, version=1, evaluated_at=now))
        s.flush()
        return
    moved = s.execute(
        update(AlertCursorRow)
        .where(AlertCursorRow.run_id == run.id, AlertCursorRow.version == run.version)
        .values(last_step=last_step, version=run.version + 1, evaluated_at=now)
    ).rowcount
    if moved != 1:
        raise _LostRace()


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


# --------------------------------------------------------------------------- notification


def events_to_notify(db: Database, run_ids: Sequence[int] | None = None) -> list[AlertEvent]:
    """Episodes with a notification still owed: fired but not announced, or resolved after
    their firing was announced."""
    q = select(AlertEventRow).where(
        or_(
            and_(
                AlertEventRow.state.in_(("firing", "resolved")),
                AlertEventRow.notified_firing.is_(False),
            ),
            and_(
                AlertEventRow.state == "resolved",
                AlertEventRow.notified_firing.is_(True),
                AlertEventRow.notified_resolved.is_(False),
            ),
        )
    )
    if run_ids is not None:
        q = q.where(AlertEventRow.run_id.in_(list(run_ids)))
    with db.session() as s:
        return [_event(r) for r in s.scalars(q.order_by(AlertEventRow.id)).all()]


def enqueue_notifications(
    db: Database,
    run_id: int | None,
    messages: Sequence[OutgoingMessage],
    *,
    announced: Mapping[int, tuple[bool, bool]],
    now: float,
) -> bool:
    """Atomically put ``messages`` in the outbox and mark the episodes of ``announced``
    (event id -> (notified_firing, notified_resolved)) as notified. ``messages`` may be empty
    to mark episodes whose notification is suppressed (silenced).

    Returns False (storing nothing) when another engine flagged one of the episodes first.
    """
    try:
        with db.session() as s:
            for event_id, (firing, resolved) in announced.items():
                row = s.get(AlertEventRow, event_id, with_for_update=not db.is_sqlite)
                if row is None:
                    raise _LostRace()
                changed = False
                if firing and not row.notified_firing:
                    row.notified_firing = True
                    changed = True
                if resolved and not row.notified_resolved:
                    row.notified_resolved = True
                    changed = True
                if changed:  # a firing or resolved notice shows the peak so far
                    row.escalation_notified_step = row.escalated_step
                if not changed:
                    raise _LostRace()
            for m in messages:
                s.add(
                    AlertNotificationRow(
                        run_id=run_id,
                        channel=m.channel,
                        subject=m.subject,
                        payload=m.payload,
                        event_ids=sorted(announced),
                        status="pending",
                        attempts=0,
                        created_at=now,
                        next_attempt_at=now,
                    )
                )
            s.flush()
    except _LostRace:
        return False
    return True


def escalations_to_notify(db: Database, run_ids: Sequence[int] | None = None) -> list[AlertEvent]:
    """Firing episodes, already announced, whose peak escalated past what was announced."""
    q = select(AlertEventRow).where(
        AlertEventRow.state == "firing",
        AlertEventRow.notified_firing.is_(True),
        AlertEventRow.escalated_step.is_not(None),
        or_(
            AlertEventRow.escalation_notified_step.is_(None),
            AlertEventRow.escalated_step > AlertEventRow.escalation_notified_step,
        ),
    )
    if run_ids is not None:
        q = q.where(AlertEventRow.run_id.in_(list(run_ids)))
    with db.session() as s:
        return [_event(r) for r in s.scalars(q.order_by(AlertEventRow.id)).all()]


def enqueue_escalations(
    db: Database,
    run_id: int,
    messages: Sequence[OutgoingMessage],
    *,
    escalated: Mapping[int, int],
    now: float,
) -> bool:
    """Atomically put ``messages`` in the outbox and record the escalations of ``escalated``
    (event id -> escalated step) as announced; False (storing nothing) when another engine
    announced one of them first."""
    try:
        with db.session() as s:
            for event_id, step in escalated.items():
                moved = s.execute(
                    update(AlertEventRow)
                    .where(
                        AlertEventRow.id == event_id,
                        or_(
                            AlertEventRow.escalation_notified_step.is_(None),
                            AlertEventRow.escalation_notified_step < step,
                        ),
                    )
                    .values(escalation_notified_step=step)
                ).rowcount
                if moved != 1:
                    raise _LostRace()
            for m in messages:
                s.add(
                    AlertNotificationRow(
                        run_id=run_id,
                        channel=m.channel,
                        subject=m.subject,
                        payload=m.payload,
                        event_ids=sorted(escalated),
                        status="pending",
                        attempts=0,
                        created_at=now,
                        next_attempt_at=now,
                    )
                )
            s.flush()
    except _LostRace:
        return False
    return True


def claim_notifications(
    db: Database,
    now: float,
    *,
    lease_s: float = 120.0,
    limit: int = 20,
    claimed_by: str | None = None,
    channel: str | None = None,
    not_channels: Sequence[str] = (),
) -> list[Notification]:
    """Pending outbox rows that are due, oldest first, each claimed by ``claimed_by`` until
    ``now + lease_s`` (a conditional update: of two watchers claiming one row, one gets it;
    the other skips it until the lease expires, which it does only if the claimer died,
    because a delivery's deadline is shorter than its lease). ``channel``: only rows of
    that channel; ``not_channels``: none of those."""
    due = [
        AlertNotificationRow.status == "pending",
        AlertNotificationRow.next_attempt_at <= now,
        or_(
            AlertNotificationRow.claimed_until.is_(None),
            AlertNotificationRow.claimed_until < now,
        ),
    ]
    if channel is not None:
        due.append(AlertNotificationRow.channel == channel)
    if not_channels:
        due.append(AlertNotificationRow.channel.not_in(list(not_channels)))
    with db.session() as s:
        ids = s.scalars(
            select(AlertNotificationRow.id)
            .where(*due)
            .order_by(AlertNotificationRow.id)
            .limit(limit)
        ).all()
    claimed = []
    for nid in ids:
        with db.session() as s:
            got = s.execute(
                update(AlertNotificationRow)
                .where(AlertNotificationRow.id == nid, *due)
                .values(claimed_until=now + lease_s, claimed_by=claimed_by)
            ).rowcount
            if got == 1:
                claimed.append(_notification(s.get(AlertNotificationRow, nid)))
    return claimed


def _held_by(claimed_by: str | None) -> Any:
    """Rows this claimer may record on: its own claim, or no claim at all."""
    if claimed_by is None:
        return true()
    return or_(
        AlertNotificationRow.claimed_by == claimed_by,
        AlertNotificationRow.claimed_by.is_(None),
    )


def mark_sent(
    db: Database, notification_id: int, now: float, *, claimed_by: str | None = None
) -> bool:
    """Record that the channel accepted the notification. Recorded even when the lease
    was lost meanwhile (it was sent); returns False then, for the caller to log."""
    with db.session() as s:
        row = s.get(AlertNotificationRow, notification_id)
        if row is None or row.status == "sent":
            return False
        ours = claimed_by is None or row.claimed_by in (None, claimed_by)
        row.status = "sent"
        row.sent_at = now
        row.claimed_until = None
        row.claimed_by = None
        row.last_error = None
        row.attempts = row.attempts + 1
        s.flush()
        return ours


def release_claim(db: Database, notification_id: int, *, claimed_by: str | None = None) -> None:
    """Give a claimed outbox row back untried."""
    with db.session() as s:
        s.execute(
            update(AlertNotificationRow)
            .where(AlertNotificationRow.id == notification_id, _held_by(claimed_by))
            .values(claimed_until=None, claimed_by=None)
        )


def mark_failed(
    db: Database,
    notification_id: int,
    *,
    error: str,
    next_attempt_at: float,
    dead: bool,
    claimed_by: str | None = None,
) -> bool:
    """Record a failed attempt: retried at ``next_attempt_at``, or given up (``dead``).
    Only on a row still claimed by ``claimed_by`` (and still pending): False otherwise."""
    with db.session() as s:
        got = s.execute(
            update(AlertNotificationRow)
            .where(
                AlertNotificationRow.id == notification_id,
                AlertNotificationRow.status == "pending",
                _held_by(claimed_by),
            )
            .values(
                status="dead" if dead else "pending",
                next_attempt_at=next_attempt_at,
                claimed_until=None,
                claimed_by=None,
                last_error=error[:2000],
                attempts=AlertNotificationRow.attempts + 1,
            )
        ).rowcount
    return got == 1


def announced_firing_counts(db: Database, run_id: int, since: float) -> dict[str, int]:
    """Per rule: the episodes of ``run_id`` that notifications enqueued at or after
    ``since`` announced (each counted once, whatever its channels): what the cap on
    notifications per (run, rule) per window counts."""
    with db.session() as s:
        lists = s.scalars(
            select(AlertNotificationRow.event_ids).where(
                AlertNotificationRow.run_id == run_id,
                AlertNotificationRow.created_at >= since,
            )
        ).all()
        ids = sorted({int(i) for ids in lists for i in ids or ()})
        if not ids:
            return {}
        rows = s.execute(
            select(AlertEventRow.rule, func.count())
            .where(AlertEventRow.id.in_(ids))
            .group_by(AlertEventRow.rule)
        ).all()
    return {rule: int(n) for rule, n in rows}


def list_notifications(
    db: Database, *, status: str | None = None, limit: int = 200
) -> pd.DataFrame:
    """The outbox, newest first: id, run_id, channel, subject, status, attempts, created_at,
    next_attempt_at, sent_at, last_error, event_ids, claimed_by (the watcher sending it now,
    or that died sending it: None once recorded)."""
    q = select(AlertNotificationRow).order_by(AlertNotificationRow.id.desc()).limit(limit)
    if status is not None:
        q = q.where(AlertNotificationRow.status == status)
    with db.session() as s:
        rows = [_notification(r) for r in s.scalars(q).all()]
    cols = [
        "id", "run_id", "channel", "subject", "status", "attempts", "created_at",
        "next_attempt_at", "sent_at", "last_error", "event_ids", "claimed_by",
    ]  # fmt: skip
    return pd.DataFrame([{c: getattr(n, c) for c in cols} for n in rows], columns=cols)


def outbox_counts(db: Database) -> dict[str, int]:
    with db.session() as s:
        rows = s.execute(
            select(AlertNotificationRow.status, func.count()).group_by(AlertNotificationRow.status)
        ).all()
    return {status: int(n) for status, n in rows}


# --------------------------------------------------------------------------- dashboard API


def get_event(db: Database, event_id: int) -> AlertEvent:
    with db.session() as s:
        row = s.get(AlertEventRow, int(event_id))
        if row is None:
            raise NotFound(f"alert event {event_id} does not exist")
        return _event(row)


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
        ev = _event(ev_row)
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
        return _event(row)


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
        return _silence(row)


def unsilence(db: Database, silence_id: int, *, now: float | None = None) -> Silence:
    """End a silence now (the record is kept)."""
    now = time.time() if now is None else now
    with db.session() as s:
        row = s.get(AlertSilenceRow, int(silence_id))
        if row is None:
            raise NotFound(f"silence {silence_id} does not exist")
        row.until = min(row.until, now)
        s.flush()
        return _silence(row)


def _active_silences(s: Any, now: float) -> list[Silence]:
    return [
        _silence(r)
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
