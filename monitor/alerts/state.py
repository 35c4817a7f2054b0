"""The state machine of one (run, rule), step by step. Pure: no database, no clock.

```
          holds            held `for` steps              clear `keep_firing_for` steps
   ok ─────────────▶ pending ─────────────────▶ firing ─────────────────────────────▶ ok
    ▲                   │ clear before `for`                         (episode resolved)
    └───────────────────┘ (episode cancelled: never an alert)

   any ──(run silent past nodata_after)──▶ nodata ──(a step arrives)──▶ back where it was
   any ──(the detector raised)──────────▶ error  ──(it works again)───▶ back where it was
```

An episode (``EventDraft``) opens when the rule goes pending and carries the steps and
values the notification reports; a pending episode that clears is deleted, so the event
list holds only alerts that fired or may still fire. ``nodata`` and ``error`` freeze the
counters and keep the episode open: a stalled run is never "resolved".

Each episode tracks its peak: the largest level (``Finding.level``, the KL itself, else the
finding's value) of the steps where its condition held. Once firing, a peak that reaches
``escalate_factor`` x the level last announced (the peak when it fired) escalates it: the
step is recorded for the engine to notify, and the next escalation needs another factor.
After a resolve the rule sits out ``cooldown`` counted rows before it can open a new
episode, so a condition hovering at its threshold cannot flap into a stream of alerts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monitor.alerts.rules import Rule
from monitor.store.alerts import EventDraft, RuleStateDraft

#: Rule states that hide the underlying pending/firing/ok.
SUSPENDED = ("nodata", "error")


@dataclass(frozen=True)
class Transition:
    """A change of a (run, rule) state. ``event`` is the episode it belongs to (None for
    nodata/error changes of a rule with no open episode)."""

    run_id: int
    rule: str
    severity: str
    detector: str
    from_state: str
    to_state: str
    step: int | None
    value: float | None
    threshold: float | None
    message: str
    event: EventDraft | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "rule": self.rule,
            "severity": self.severity,
            "detector": self.detector,
            "from": self.from_state,
            "to": self.to_state,
            "step": self.step,
            "value": self.value,
            "threshold": self.threshold,
            "message": self.message,
            "event_id": None if self.event is None else self.event.id,
        }


def underlying(st: RuleStateDraft) -> str:
    """The pending/firing/ok state beneath nodata or error: the open episode's state."""
    if st.event is not None and not st.event.deleted and st.event.state in ("pending", "firing"):
        return st.event.state
    return "ok"


def resume(st: RuleStateDraft) -> str | None:
    """Leave nodata/error for the state beneath; returns the state left (None if none)."""
    if st.state in SUSPENDED:
        left = st.state
        st.state = underlying(st)
        return left
    return None


def observe(
    rule: Rule,
    st: RuleStateDraft,
    *,
    run_id: int,
    step: int,
    finding: Any | None,
    now: float,
    touched: dict[int, EventDraft],
) -> list[Transition]:
    """Advance ``st`` by one evaluated step: ``finding`` is the detector's Finding at that
    step (None: the condition does not hold). Episodes changed are added to ``touched``
    (keyed by ``id(draft)``) for the caller to store."""
    if rule.time_based:
        return _observe_time_based(
            rule, st, run_id=run_id, step=step, finding=finding, now=now, touched=touched
        )
    out: list[Transition] = []
    left = resume(st)
    if left is not None:
        note = "steps arrive again" if left == "nodata" else "the detector works again"
        out.append(_t(rule, run_id, left, st.state, step, None, None, st.event, note))
    if st.state == "ok" and st.cooldown_left > 0:
        st.cooldown_left -= 1  # re-fire cool-down: this row opens nothing
        return out
    if finding is not None:
        value, threshold = _num(finding.value), _num(finding.threshold)
        if st.state == "ok":
            ev = _new_event(rule, run_id, finding, step, now, "pending")
            _open(st, ev, step, touched)
            out.append(_t(rule, run_id, "ok", "pending", step, value, threshold, ev))
        else:
            ev = st.event
            assert ev is not None
            touched[id(ev)] = ev
            ev.last_step, ev.last_value = step, value
            _track_peak(rule, ev, finding, step)
            st.clear_steps = 0
            if st.state == "pending":
                st.hold_steps += 1
        if st.state == "pending" and st.hold_steps >= rule.steps_to_fire:
            ev = st.event
            assert ev is not None
            ev.state, ev.fired_step, ev.fired_at = "firing", step, now
            ev.value, ev.threshold = value, threshold
            ev.message = str(finding.message)
            ev.causes = tuple(str(c) for c in finding.causes)
            ev.escalate_at = _next_escalation(rule, ev.peak_value)
            st.state, st.since_step = "firing", step
            out.append(_t(rule, run_id, "pending", "firing", step, value, threshold, ev))
        return out
    # the condition does not hold at this step
    if st.state == "pending":
        ev = st.event
        assert ev is not None
        ev.deleted = True
        touched[id(ev)] = ev
        st.event, st.state, st.hold_steps, st.clear_steps, st.since_step = None, "ok", 0, 0, step
        out.append(_t(rule, run_id, "pending", "ok", step, None, None, ev))
    elif st.state == "firing":
        st.clear_steps += 1
        if st.clear_steps >= rule.steps_to_resolve:
            out.append(_resolve(rule, st, run_id, step, now, touched))
    return out


def _observe_time_based(
    rule: Rule,
    st: RuleStateDraft,
    *,
    run_id: int,
    step: int,
    finding: Any | None,
    now: float,
    touched: dict[int, EventDraft],
) -> list[Transition]:
    """A clock-judged rule (stalled): fires when the detector reports the run's last step,
    resolves as soon as it does not; ``for`` and ``keep_firing_for`` do not apply."""
    resume(st)
    if finding is not None and st.state == "ok":
        value, threshold = _num(finding.value), _num(finding.threshold)
        ev = _new_event(rule, run_id, finding, step, now, "firing", fired_step=step, fired_at=now)
        _open(st, ev, step, touched)
        return [_t(rule, run_id, "ok", "firing", step, value, threshold, ev)]
    if finding is not None and st.event is not None:
        st.event.last_value = _num(finding.value)
        touched[id(st.event)] = st.event
        return []
    if finding is None and st.state == "firing":
        return [_resolve(rule, st, run_id, step, now, touched)]
    return []


def _open(st: RuleStateDraft, ev: EventDraft, step: int, touched: dict[int, EventDraft]) -> None:
    """``st`` enters the new episode ``ev`` (in ev's state) at ``step``, held for one step."""
    st.event, st.state, st.hold_steps, st.clear_steps, st.since_step = ev, ev.state, 1, 0, step
    touched[id(ev)] = ev


def _resolve(
    rule: Rule,
    st: RuleStateDraft,
    run_id: int,
    step: int,
    now: float,
    touched: dict[int, EventDraft],
) -> Transition:
    ev = st.event
    assert ev is not None
    ev.state, ev.end_step, ev.resolved_at = "resolved", step, now
    touched[id(ev)] = ev
    st.event, st.state, st.hold_steps, st.clear_steps, st.since_step = None, "ok", 0, 0, step
    st.cooldown_left = 0 if rule.time_based else rule.cooldown
    return _t(rule, run_id, "firing", "resolved", step, ev.last_value, ev.threshold, ev)


def suspend(
    rule: Rule, st: RuleStateDraft, *, run_id: int, to: str, step: int | None, message: str
) -> Transition | None:
    """Put a rule in ``nodata`` or ``error`` (counters frozen, episode kept open)."""
    if st.state == to:
        return None
    before = st.state
    st.state = to
    return _t(rule, run_id, before, to, step, None, None, st.event, message)


def _t(
    rule: Rule,
    run_id: int,
    before: str,
    after: str,
    step: int | None,
    value: float | None,
    threshold: float | None,
    ev: EventDraft | None,
    message: str | None = None,
) -> Transition:
    return Transition(
        run_id=run_id,
        rule=rule.name,
        severity=rule.severity,
        detector=rule.detector,
        from_state=before,
        to_state=after,
        step=step,
        value=value,
        threshold=threshold,
        message=message if message is not None else (ev.message if ev else ""),
        event=ev,
    )


def _level(finding: Any) -> float | None:
    """What the peak is measured on: the finding's level (the KL), else its value."""
    level = _num(getattr(finding, "level", None))
    return level if level is not None else _num(finding.value)


def _next_escalation(rule: Rule, peak: float | None) -> float | None:
    """The |level| at which an episode whose announced peak is ``peak`` escalates."""
    if rule.escalate_factor <= 0 or peak is None or peak == 0:
        return None
    return rule.escalate_factor * abs(peak)


def _track_peak(rule: Rule, ev: EventDraft, finding: Any, step: int) -> None:
    """Raise the episode's peak to this finding's level if larger (in magnitude: a
    negative KL peaks at its most negative); a firing episode escalates past its mark."""
    level = _level(finding)
    if level is None or (ev.peak_value is not None and abs(level) <= abs(ev.peak_value)):
        return
    ev.peak_value, ev.peak_step = level, step
    if ev.state == "firing" and ev.escalate_at is not None and abs(level) >= ev.escalate_at:
        ev.escalated_step = step
        ev.escalate_at = _next_escalation(rule, level)


def _new_event(
    rule: Rule, run_id: int, finding: Any, step: int, now: float, state: str, **extra: Any
) -> EventDraft:
    """The episode a finding opens at ``step``."""
    value = _num(finding.value)
    level = _level(finding)
    if state == "firing":
        extra.setdefault("escalate_at", _next_escalation(rule, level))
    return EventDraft(
        run_id=run_id,
        rule=rule.name,
        detector=rule.detector,
        severity=rule.severity,
        state=state,
        start_step=step,
        message=str(finding.message),
        started_at=now,
        value=value,
        threshold=_num(finding.threshold),
        causes=tuple(str(c) for c in finding.causes),
        last_step=step,
        last_value=value,
        peak_value=level,
        peak_step=None if level is None else step,
        **extra,
    )


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v and abs(v) != float("inf") else None
