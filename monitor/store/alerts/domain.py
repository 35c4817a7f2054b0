"""Alert domain objects (episodes, drafts, silences, outbox rows) and their ORM converters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from monitor.store.models import (
    AlertEventRow,
    AlertNotificationRow,
    AlertSilenceRow,
)

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


class LostRace(Exception):
    """Another evaluator advanced the cursor (or flagged the events) first."""


# --------------------------------------------------------------------------- converters


# The columns an episode's stored form (AlertEvent) and working copy (EventDraft) take as
# they are; start_step and causes are normalised in _episode_fields.
_EPISODE_COLUMNS = (
    "id",
    "run_id",
    "rule",
    "detector",
    "severity",
    "state",
    "value",
    "threshold",
    "last_value",
    "message",
    "started_at",
    "fired_at",
    "resolved_at",
    "peak_value",
)


def _episode_fields(row: AlertEventRow) -> dict[str, Any]:
    """What AlertEvent and EventDraft both take from an episode row."""
    fields = {name: getattr(row, name) for name in _EPISODE_COLUMNS}
    fields["start_step"] = int(row.start_step)
    fields["causes"] = tuple(row.causes or ())
    return fields


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def event_from_row(row: AlertEventRow) -> AlertEvent:
    return AlertEvent(
        **_episode_fields(row),
        fired_step=_optional_int(row.fired_step),
        end_step=_optional_int(row.end_step),
        last_step=_optional_int(row.last_step),
        acknowledged_at=row.acknowledged_at,
        acknowledged_by=row.acknowledged_by,
        notified_firing=bool(row.notified_firing),
        notified_resolved=bool(row.notified_resolved),
        peak_step=_optional_int(row.peak_step),
        escalated_step=_optional_int(row.escalated_step),
        escalation_notified_step=_optional_int(row.escalation_notified_step),
    )


def draft_from_row(row: AlertEventRow) -> EventDraft:
    return EventDraft(
        **_episode_fields(row),
        fired_step=row.fired_step,
        end_step=row.end_step,
        last_step=row.last_step,
        peak_step=row.peak_step,
        escalate_at=row.escalate_at,
        escalated_step=row.escalated_step,
    )


def silence_from_row(row: AlertSilenceRow) -> Silence:
    return Silence(
        row.id, row.run_id, row.rule, row.until, row.created_at, row.created_by, row.reason
    )


def notification_from_row(row: AlertNotificationRow) -> Notification:
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
