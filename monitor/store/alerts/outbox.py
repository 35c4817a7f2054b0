"""The notification outbox: owed notifications, enqueueing them with a compare-and-set on
the episodes' ``notified_*`` flags, claiming rows with a lease, and recording the outcome."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from sqlalchemy import and_, func, or_, select, true, update

from monitor.store.alerts.domain import (
    AlertEvent,
    LostRace,
    Notification,
    OutgoingMessage,
    event_from_row,
    notification_from_row,
)
from monitor.store.database import Database
from monitor.store.models import (
    AlertEventRow,
    AlertNotificationRow,
)

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
    return _events_in_order(db, q, run_ids)


def _events_in_order(db: Database, q: Any, run_ids: Sequence[int] | None) -> list[AlertEvent]:
    """The episodes ``q`` selects (of ``run_ids`` when given), oldest first."""
    if run_ids is not None:
        q = q.where(AlertEventRow.run_id.in_(list(run_ids)))
    with db.session() as s:
        return [event_from_row(r) for r in s.scalars(q.order_by(AlertEventRow.id)).all()]


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
                    raise LostRace()
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
                    raise LostRace()
            _add_to_outbox(s, run_id, messages, sorted(announced), now)
    except LostRace:
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
    return _events_in_order(db, q, run_ids)


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
                    raise LostRace()
            _add_to_outbox(s, run_id, messages, sorted(escalated), now)
    except LostRace:
        return False
    return True


def _add_to_outbox(
    s: Any,
    run_id: int | None,
    messages: Sequence[OutgoingMessage],
    event_ids: list[int],
    now: float,
) -> None:
    """Queue ``messages`` (due now) in the session's transaction."""
    for m in messages:
        s.add(
            AlertNotificationRow(
                run_id=run_id,
                channel=m.channel,
                subject=m.subject,
                payload=m.payload,
                event_ids=event_ids,
                status="pending",
                attempts=0,
                created_at=now,
                next_attempt_at=now,
            )
        )
    s.flush()


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
                claimed.append(notification_from_row(s.get(AlertNotificationRow, nid)))
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
        rows = [notification_from_row(r) for r in s.scalars(q).all()]
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
