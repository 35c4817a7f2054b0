"""Alert state in the database: per-run cursors, per-(run, rule) states, episodes (events),
silences and the notification outbox. Returns domain objects and DataFrames, never ORM rows.

One module per concern: ``domain`` (the objects and their converters), ``evaluation`` (cursors,
rule states, episodes), ``outbox`` (notifications owed, queued, claimed, sent) and ``queries``
(what the dashboard and ``klmon alerts`` ask: episodes, acknowledgements, silences). This
package re-exports their public names, so callers use ``monitor.store.alerts``.

Concurrency: an evaluation is committed with a compare-and-set on the run's cursor version
(``commit_evaluation`` returns False when another evaluator got there first), a notification
is enqueued with a compare-and-set on the events' ``notified_*`` flags, and an outbox row is
claimed with a lease (``claimed_by``, ``claimed_until``) before it is sent. Two engines on
one database therefore never record the same transition twice nor send the same
notification twice at once; a notification is sent again only when its claimer died
between the channel's accept and ``mark_sent`` (at least once, with the same Message-ID /
Idempotency-Key).
"""

from monitor.store.alerts.domain import (
    EVENT_COLUMNS,
    EVENT_STATES,
    RULE_STATES,
    SEVERITIES,
    AlertEvent,
    EventDraft,
    Notification,
    OutgoingMessage,
    RuleStateDraft,
    RunToEvaluate,
    Silence,
)
from monitor.store.alerts.evaluation import (
    commit_evaluation,
    load_rule_states,
    read_evaluation_window,
    read_steps_around,
    runs_to_evaluate,
)
from monitor.store.alerts.outbox import (
    announced_firing_counts,
    claim_notifications,
    enqueue_escalations,
    enqueue_notifications,
    escalations_to_notify,
    events_to_notify,
    list_notifications,
    mark_failed,
    mark_sent,
    outbox_counts,
)
from monitor.store.alerts.queries import (
    acknowledge_event,
    active_silences,
    evaluation_cursor,
    event_markers,
    list_events,
    list_rule_states,
    list_silences,
    open_event_counts,
    silence,
    unsilence,
)

__all__ = [
    "EVENT_COLUMNS",
    "EVENT_STATES",
    "RULE_STATES",
    "SEVERITIES",
    "AlertEvent",
    "EventDraft",
    "Notification",
    "OutgoingMessage",
    "RuleStateDraft",
    "RunToEvaluate",
    "Silence",
    "acknowledge_event",
    "active_silences",
    "announced_firing_counts",
    "claim_notifications",
    "commit_evaluation",
    "enqueue_escalations",
    "enqueue_notifications",
    "escalations_to_notify",
    "evaluation_cursor",
    "event_markers",
    "events_to_notify",
    "list_events",
    "list_notifications",
    "list_rule_states",
    "list_silences",
    "load_rule_states",
    "mark_failed",
    "mark_sent",
    "open_event_counts",
    "outbox_counts",
    "read_evaluation_window",
    "read_steps_around",
    "runs_to_evaluate",
    "silence",
    "unsilence",
]
