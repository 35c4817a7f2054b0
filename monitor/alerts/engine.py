"""The alert engine: evaluate new steps, store states, notify through the outbox.

One pass (``run_once``) has three phases, each safe to interrupt and repeat:

1. **evaluate**: for every run with steps past its cursor (finished and imported runs
   too), read the new steps plus the rows the detectors' windows need, advance each
   (run, rule) state machine step by step, and store the episodes, states and the new
   cursor in one transaction (a compare-and-set on the cursor: a concurrent engine's
   duplicate is discarded). Running runs are also judged on the clock: the ``stalled``
   detector, and "no data" once a run is silent for ``nodata_after`` seconds.
2. **notify**: episodes owed an announcement (fired, or resolved after their firing was
   announced) are grouped per run, rendered once (email + webhook payloads) and put in
   the outbox in the same transaction that marks them notified. Silenced ones are held
   back (a still-firing one is announced when its silence ends).
   At most ``max_per_rule`` firing episodes of one (run, rule) are announced per
   ``max_window`` seconds; later ones wait like silenced ones (announced once the window
   has room if still firing, never if they resolved meanwhile).
3. **deliver** (monitor.alerts.delivery): due outbox rows are claimed with a lease and
   sent on per-channel worker pools, each send within a total deadline; a row is marked
   sent only after the channel accepted it, else retried with exponential backoff.
   ``watch`` delivers in its own thread, so evaluation never waits for a receiver.

Time comes from the injected ``clock``; nothing here sleeps except ``watch``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from monitor.alerts.delivery import Delivery
from monitor.alerts.notify import Sender, channels_for, senders_for
from monitor.alerts.render import RunLabel, render, render_escalation, warm_up, worst
from monitor.alerts.rules import Rule, RuleSet, load_rules
from monitor.alerts.settings import AlertSettings
from monitor.alerts.state import Transition, observe, resume, suspend
from monitor.analytics import EXTRA_METRIC_SUFFIXES, RunContext, has_inputs
from monitor.errors import KlmonError
from monitor.store import alerts as alert_store
from monitor.store.database import Database
from monitor.store.drilldown import read_samples, sample_steps
from monitor.store.steps import read_metrics_by_suffix
from monitor.store.vocabulary_notes import StepVocabulary, step_vocabulary

log = logging.getLogger("monitor.alerts")

#: Rows read before the cursor: at least this, or 4x a detector's own lookback (windows
#: count rows holding their series, and sparse series need more raw rows).
MIN_TAIL_ROWS = 256
#: First rows of the run read for detectors whose baseline is the warm-up.
MIN_HEAD_ROWS = 256
#: New steps evaluated per transaction (a big import is evaluated in chunks).
CHUNK_ROWS = 20_000


@dataclass
class PassReport:
    """What one pass did."""

    runs_evaluated: int = 0
    steps_evaluated: int = 0
    transitions: list[Transition] = field(default_factory=list)
    run_labels: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notifications_enqueued: int = 0
    sent: int = 0
    failed: int = 0
    pending: int = 0

    @property
    def fired(self) -> list[Transition]:
        return [t for t in self.transitions if t.to_state == "firing"]

    @property
    def resolved(self) -> list[Transition]:
        return [t for t in self.transitions if t.to_state == "resolved"]

    def as_dict(self) -> dict[str, Any]:
        def with_run(t: Transition) -> dict[str, Any]:
            d = t.as_dict()
            d["run"] = self.run_labels.get(t.run_id)
            return d

        return {
            "runs_evaluated": self.runs_evaluated,
            "steps_evaluated": self.steps_evaluated,
            "fired": [with_run(t) for t in self.fired],
            "resolved": [with_run(t) for t in self.resolved],
            "transitions": [with_run(t) for t in self.transitions],
            "notifications": {
                "enqueued": self.notifications_enqueued,
                "sent": self.sent,
                "failed": self.failed,
                "pending": self.pending,
            },
            "errors": list(self.errors),
        }


def window_plan(rules: Sequence[Rule]) -> tuple[int | None, int]:
    """(tail rows, head rows) an evaluation reads around the cursor for ``rules``; a tail
    of None reads the whole history (a detector klmon does not know the windows of)."""
    from monitor.analytics import DEFAULT_PARAMS, lookback_rows

    tail: int | None = MIN_TAIL_ROWS
    head = 0
    for rule in rules:
        if rule.time_based:
            continue
        if rule.detector not in DEFAULT_PARAMS:
            tail = None
            continue
        need = lookback_rows(rule.detector, **rule.params)
        if need is None:  # baseline from the run's first rows
            rows = [v for k, v in _all_params(rule).items() if k.endswith("_rows")]
            widest = max((int(v) for v in rows if isinstance(v, int | float)), default=0)
            head = max(head, MIN_HEAD_ROWS, 8 * widest)
            need_tail = 4 * widest + 64
        else:
            need_tail = 4 * int(need) + 64
        if tail is not None:
            tail = max(tail, need_tail)
    return tail, head


def _all_params(rule: Rule) -> dict[str, Any]:
    from monitor.analytics import DEFAULT_PARAMS

    return {**DEFAULT_PARAMS.get(rule.detector, {}), **rule.params}


class AlertEngine:
    """Evaluates rules over the runs of ``db`` and sends notifications.

    ``clock`` (Unix seconds) and ``senders`` are injectable for tests; ``detectors``
    defaults to ``monitor.analytics.DETECTORS``.
    """

    def __init__(
        self,
        db: Database,
        rules: RuleSet | None = None,
        *,
        settings: AlertSettings | None = None,
        clock: Callable[[], float] = time.time,
        senders: Mapping[str, Sender] | None = None,
        detectors: Mapping[str, Callable[..., Any]] | None = None,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self.db = db
        self.settings = settings or AlertSettings.from_env()
        self.rules = rules if rules is not None else load_rules(self.settings.rules_path)
        self.clock = clock
        self.senders = dict(senders) if senders is not None else senders_for(self.settings)
        if detectors is None:
            from monitor.analytics import DETECTORS

            detectors = DETECTORS
        self.detectors = detectors
        self.chunk_rows = chunk_rows
        self.tail_rows, self.head_rows = window_plan(self.rules.enabled)
        self.delivery = Delivery(db, self.senders, self.settings, clock)
        self._held: set[int] = set()  # episodes held back by the cap (logged once)

    # ------------------------------------------------------------------ one pass

    def run_once(self, run_ids: Sequence[int] | None = None) -> PassReport:
        """Evaluate, notify and deliver once (``klmon alerts check``)."""
        report = self.evaluate(run_ids)
        report.notifications_enqueued = self.notify(run_ids, report=report)
        self.deliver(report=report)
        return report

    def evaluate(self, run_ids: Sequence[int] | None = None) -> PassReport:
        report = PassReport()
        now = self.clock()
        for run in alert_store.runs_to_evaluate(self.db, run_ids):
            report.run_labels[run.id] = f"{run.project}/{run.name}"
            try:
                self._evaluate_run(run, now, report)
            except KlmonError as exc:
                log.error("run %s: evaluation failed: %s", run.id, exc)
                report.errors.append(f"run {run.id}: {exc}")
        return report

    def _needs_visit(self, run: alert_store.RunToEvaluate, now: float) -> bool:
        if run.has_new_steps or run.has_open:
            return True
        if run.status != "running":
            return False
        # a clock-judged rule can only fire once the run is silent for its minimum
        silent = now - run.last_seen_at
        for rule in self.rules.enabled:
            if rule.time_based and silent > float(_all_params(rule).get("min_seconds", 0.0)):
                return True
        return self._stale(run, now)

    def _stale(self, run: alert_store.RunToEvaluate, now: float) -> bool:
        return run.status == "running" and now - run.last_seen_at > self.settings.nodata_after

    def _evaluate_run(self, run: alert_store.RunToEvaluate, now: float, report: PassReport) -> None:
        if not self._needs_visit(run, now):
            return
        rules = self.rules.enabled
        states = alert_store.load_rule_states(self.db, run.id)
        for rule in rules:
            states.setdefault(rule.name, alert_store.RuleStateDraft(rule.name))
        ctx = RunContext(
            config=run.config, status=run.status, last_seen_at=run.last_seen_at, now=now
        )
        first, counted = True, False
        while first or run.has_new_steps:
            first = False
            transitions: list[Transition] = []
            touched: dict[int, alert_store.EventDraft] = {}
            if run.has_new_steps or (
                run.max_step is not None
                and (run.status == "running" or any(s.state != "ok" for s in states.values()))
            ):
                df = self._read_window(run)
            else:
                df = pd.DataFrame({"step": pd.Series(dtype="int64")})
            steps = df["step"].to_numpy()
            new_mask = steps > run.cursor if run.cursor is not None else steps == steps
            new = df[new_mask]
            for rule in rules:
                transitions += self._evaluate_rule(
                    rule, states[rule.name], run, df, new, ctx, now, touched
                )
            last_step = int(new["step"].iloc[-1]) if len(new) else run.cursor
            more = len(new) >= self.chunk_rows and last_step != run.max_step
            if not more:
                transitions += self._apply_staleness(run, states, now)
            if not transitions and not touched and last_step == run.cursor:
                break  # nothing changed: no write
            ok = alert_store.commit_evaluation(
                self.db,
                run,
                last_step=last_step,
                states=list(states.values()),
                events=list(touched.values()),
                now=now,
            )
            if not ok:
                log.info("run %s: another evaluator got there first", run.id)
                return
            if len(new) and not counted:
                report.runs_evaluated += 1
                counted = True
            report.steps_evaluated += len(new)
            report.transitions += transitions
            for t in transitions:
                if t.to_state in ("firing", "resolved"):
                    log.warning(
                        "%s %s [%s] %s at step %s: %s",
                        t.to_state.upper(),
                        report.run_labels.get(run.id, run.id),
                        t.severity,
                        t.rule,
                        t.step,
                        t.message,
                    )
            run = _advanced(run, last_step)
            if not more:
                break

    def _read_window(self, run: alert_store.RunToEvaluate) -> pd.DataFrame:
        """The rows every detector judges the steps after ``run.cursor`` on: the run's head,
        a tail before the cursor, and up to ``chunk_rows`` new steps, with their extra
        metrics. One read for a busy run and a quiet one: steps that land between listing
        the runs and this read are new steps too, and are judged on the same window (a
        quiet-run read without the head once made ``reference_offset`` judge a mid-run
        row as the run's first)."""
        df = alert_store.read_evaluation_window(
            self.db,
            run.id,
            after=run.cursor,
            lookback_rows=self.tail_rows,
            head_rows=self.head_rows,
            max_new_rows=self.chunk_rows,
        )
        return self._with_extra_metrics(run.id, df)

    def _with_extra_metrics(self, run_id: int, df: pd.DataFrame) -> pd.DataFrame:
        """Join the extra metrics detectors read (e.g. TRL's completions/clipped_ratio),
        over the head's step range and the tail's, not the history between them."""
        if df.empty:
            return df
        steps = df["step"].to_numpy()
        ranges = [(int(steps[0]), int(steps[-1]))]
        if len(steps) > 1:
            gap = int(np.argmax(np.diff(steps)))
            if steps[gap + 1] - steps[gap] > len(steps):  # the head, then the tail
                ranges = [(int(steps[0]), int(steps[gap])), (int(steps[gap + 1]), int(steps[-1]))]
        parts = [
            read_metrics_by_suffix(self.db, run_id, EXTRA_METRIC_SUFFIXES, start=a, end=b)
            for a, b in ranges
        ]
        extra = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
        if len(extra.columns) == 1:
            return df
        return df.merge(extra, on="step", how="left")

    def _evaluate_rule(
        self,
        rule: Rule,
        st: alert_store.RuleStateDraft,
        run: alert_store.RunToEvaluate,
        df: pd.DataFrame,
        new: pd.DataFrame,
        ctx: RunContext,
        now: float,
        touched: dict[int, alert_store.EventDraft],
    ) -> list[Transition]:
        if df.empty or (not rule.time_based and new.empty):
            return []
        if rule.time_based and run.status != "running" and st.state == "ok":
            return []
        try:
            findings = self.detectors[rule.detector](df, ctx, **dict(rule.params))
        except Exception as exc:  # a broken detector must not stop the other rules
            log.exception("rule %s on run %s: detector %s failed", rule.name, run.id, rule.detector)
            step = int(new["step"].iloc[-1]) if len(new) else run.cursor
            t = suspend(
                rule,
                st,
                run_id=run.id,
                to="error",
                step=step,
                message=f"detector {rule.detector} failed: {type(exc).__name__}: {exc}",
            )
            return [t] if t else []
        if rule.time_based:
            last = int(df["step"].iloc[-1])
            hit = next((f for f in findings if int(f.step) == last), None)
            return observe(
                rule, st, run_id=run.id, step=last, finding=hit, now=now, touched=touched
            )
        by_step: dict[int, Any] = {}
        for f in findings:
            by_step.setdefault(int(f.step), f)
        out: list[Transition] = []
        statuses = new["status"].to_numpy() if "status" in new.columns else None
        counts_rejected = rule.detector == "rejected_input"
        # missing is not clear: a row without the detector's inputs is skipped
        carries = has_inputs(rule.detector, new)
        for i, step in enumerate(new["step"].to_numpy()):
            if statuses is not None and statuses[i] == "rejected" and not counts_rejected:
                continue
            if not carries[i]:
                continue
            out += observe(
                rule,
                st,
                run_id=run.id,
                step=int(step),
                finding=by_step.get(int(step)),
                now=now,
                touched=touched,
            )
        return out

    def _apply_staleness(
        self,
        run: alert_store.RunToEvaluate,
        states: dict[str, alert_store.RuleStateDraft],
        now: float,
    ) -> list[Transition]:
        """No data: a running run silent past ``nodata_after`` suspends its step rules;
        leaving that (a step, a heartbeat, or the run finishing) resumes them."""
        stale = self._stale(run, now)
        out = []
        for rule in self.rules.enabled:
            if rule.time_based:
                continue
            st = states[rule.name]
            if stale:
                silent = now - run.last_seen_at
                last = "no step yet" if run.max_step is None else f"last step {run.max_step}"
                t = suspend(
                    rule,
                    st,
                    run_id=run.id,
                    to="nodata",
                    step=run.cursor,
                    message=f"no step for {silent / 60:.0f} min ({last})",
                )
                if t:
                    out.append(t)
            elif st.state == "nodata":
                before = resume(st)
                out.append(
                    Transition(
                        run.id,
                        rule.name,
                        rule.severity,
                        rule.detector,
                        before or "nodata",
                        st.state,
                        run.cursor,
                        None,
                        None,
                        "data again",
                        st.event,
                    )
                )
        return out

    # ------------------------------------------------------------------ notify

    def notify(
        self, run_ids: Sequence[int] | None = None, *, report: PassReport | None = None
    ) -> int:
        """Render and enqueue what is owed; returns the number of outbox rows added."""
        now = self.clock()
        owed = alert_store.events_to_notify(self.db, run_ids)
        if not owed and not alert_store.escalations_to_notify(self.db, run_ids):
            return 0
        silences = alert_store.active_silences(self.db, now)
        by_run: dict[int, list[alert_store.AlertEvent]] = defaultdict(list)
        for e in owed:
            by_run[e.run_id].append(e)
        added = 0
        for run_id, events in by_run.items():
            try:
                added += self._notify_run(run_id, events, silences, now)
            except KlmonError as exc:
                log.error("run %s: could not enqueue notifications: %s", run_id, exc)
                if report is not None:
                    report.errors.append(f"run {run_id}: notify: {exc}")
        added += self._notify_escalations(run_ids, silences, now, report)
        if added:
            self.delivery.wake.set()
        return added

    def _notify_run(
        self,
        run_id: int,
        events: list[alert_store.AlertEvent],
        silences: list[alert_store.Silence],
        now: float,
    ) -> int:
        fired: list[alert_store.AlertEvent] = []
        resolved: list[alert_store.AlertEvent] = []
        announced: dict[int, tuple[bool, bool]] = {}
        capped = self._cap(run_id, now)
        for e in events:
            silenced = any(s.covers(run_id, e.rule, now) for s in silences)
            if not e.notified_firing and not silenced:
                silenced = capped(e)
            if not e.notified_firing:
                if silenced:
                    if e.state == "resolved":  # came and went while silenced
                        announced[e.id] = (True, True)
                    continue  # still firing: announced when the silence ends
                fired.append(e)
                announced[e.id] = (True, e.state == "resolved")
            else:
                if not silenced:
                    resolved.append(e)
                announced[e.id] = (True, True)
        if not announced:
            return 0
        messages: list[alert_store.OutgoingMessage] = []
        if fired or resolved:
            rendered = self._render(run_id, fired, resolved)
            for channel in channels_for(self.settings):
                payload = rendered.email_payload() if channel == "email" else rendered.webhook
                messages.append(alert_store.OutgoingMessage(channel, rendered.subject, payload))
        ok = alert_store.enqueue_notifications(
            self.db, run_id, messages, announced=announced, now=now
        )
        return len(messages) if ok else 0

    def _cap(self, run_id: int, now: float) -> Callable[[alert_store.AlertEvent], bool]:
        """A test of whether an episode's firing notice is held back by the cap on firing
        notices per (run, rule) per window; it counts the ones it lets through."""
        cap = self.settings.max_per_rule
        if cap <= 0:
            return lambda _e: False
        counts = alert_store.announced_firing_counts(
            self.db, run_id, now - self.settings.max_window
        )

        def held(e: alert_store.AlertEvent) -> bool:
            if counts.get(e.rule, 0) >= cap:
                if e.id in self._held:
                    return True
                self._held.add(e.id)  # said once per episode, not on every pass
                log.warning(
                    "run %s: %s fired again (episode %s); %s notices of it in the last %g s "
                    "already: held back (KLMON_ALERT_MAX_PER_RULE)",
                    run_id,
                    e.rule,
                    e.id,
                    cap,
                    self.settings.max_window,
                )
                return True
            counts[e.rule] = counts.get(e.rule, 0) + 1
            return False

        return held

    def _notify_escalations(
        self,
        run_ids: Sequence[int] | None,
        silences: list[alert_store.Silence],
        now: float,
        report: PassReport | None,
    ) -> int:
        """One notification per run for the firing episodes whose peak escalated (a silenced
        one waits for its silence to end)."""
        by_run: dict[int, list[alert_store.AlertEvent]] = defaultdict(list)
        for e in alert_store.escalations_to_notify(self.db, run_ids):
            if not any(s.covers(e.run_id, e.rule, now) for s in silences):
                by_run[e.run_id].append(e)
        added = 0
        for run_id, events in by_run.items():
            try:
                from monitor.store.runs import get_run

                info = get_run(self.db, run_id)
                head = max(events, key=lambda e: abs(e.peak_value or 0.0))
                rendered = render_escalation(
                    RunLabel(info.id, info.project, info.name),
                    events,
                    steps=alert_store.read_steps_around(self.db, run_id, head.peak_step),
                    dashboard_url=self.settings.dashboard_url,
                    vocabulary=self._vocabulary(run_id, head.peak_step),
                )
                messages = [
                    alert_store.OutgoingMessage(
                        channel,
                        rendered.subject,
                        rendered.email_payload() if channel == "email" else rendered.webhook,
                    )
                    for channel in channels_for(self.settings)
                ]
                escalated = {e.id: int(e.escalated_step) for e in events}
                if alert_store.enqueue_escalations(
                    self.db, run_id, messages, escalated=escalated, now=now
                ):
                    added += len(messages)
            except KlmonError as exc:
                log.error("run %s: could not enqueue an escalation: %s", run_id, exc)
                if report is not None:
                    report.errors.append(f"run {run_id}: escalate: {exc}")
        return added

    def _render(
        self,
        run_id: int,
        fired: list[alert_store.AlertEvent],
        resolved: list[alert_store.AlertEvent],
    ) -> Any:
        from monitor.store.runs import get_run

        info = get_run(self.db, run_id)
        head = worst(fired) or worst(resolved)
        assert head is not None
        focus = head.fired_step if fired else head.end_step
        focus = head.start_step if focus is None else focus
        steps = alert_store.read_steps_around(self.db, run_id, focus)
        samples, sample_step = [], None
        if fired:
            have = [s for s in sample_steps(self.db, run_id) if s <= focus]
            if have:
                sample_step = have[-1]
                samples = read_samples(self.db, run_id, sample_step)
        return render(
            RunLabel(info.id, info.project, info.name),
            fired,
            resolved,
            steps=steps,
            samples=samples,
            sample_step=sample_step,
            dashboard_url=self.settings.dashboard_url,
            vocabulary=self._vocabulary(run_id, focus),
        )

    def _vocabulary(self, run_id: int, step: int | None) -> StepVocabulary | None:
        """The drift vocabulary at ``step`` for the email, or None (no ledger, or a read
        that failed: a notification is never lost over a nicety)."""
        if step is None:
            return None
        try:
            return step_vocabulary(self.db, run_id, int(step))
        except KlmonError as exc:
            log.warning("alerts: no drift vocabulary for run %s step %s: %s", run_id, step, exc)
            return None

    # ------------------------------------------------------------------ deliver

    def deliver(self, *, report: PassReport | None = None, limit: int = 50) -> int:
        """Send due outbox rows (in parallel per channel, each within the delivery
        deadline) and wait for them; returns how many were sent."""
        outcomes = self.delivery.deliver_due(limit)
        if report is not None:
            report.sent += outcomes["sent"]
            report.failed += outcomes["failed"]
            report.pending = alert_store.outbox_counts(self.db).get("pending", 0)
        return outcomes["sent"]

    # ------------------------------------------------------------------ daemon

    def watch(
        self,
        interval: float = 2.0,
        *,
        stop: threading.Event | None = None,
        on_pass: Callable[[PassReport], None] | None = None,
        max_passes: int | None = None,
    ) -> None:
        """Evaluate every ``interval`` seconds until ``stop`` is set. Delivery runs in its
        own thread (``Delivery.run``), woken as soon as a notification is enqueued, so a
        slow or unreachable channel never delays evaluation; on stop it waits for the
        sends under way (each within the delivery deadline)."""
        stop = stop or threading.Event()
        warm_up()
        sender = threading.Thread(
            target=self.delivery.run,
            args=(stop, interval),
            name="klmon-alert-delivery",
            daemon=True,
        )
        sender.start()
        passes = 0
        failures = 0
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    report = self.evaluate()
                    report.notifications_enqueued = self.notify(report=report)
                    failures = 0
                    if on_pass is not None:
                        on_pass(report)
                except KlmonError as exc:
                    failures += 1
                    log.error("alert pass failed: %s", exc)
                passes += 1
                if max_passes is not None and passes >= max_passes:
                    break
                pause = interval if failures == 0 else min(interval * 2**failures, 60.0)
                stop.wait(max(0.0, pause - (time.monotonic() - started)))
        finally:
            stop.set()
            self.delivery.wake.set()
            sender.join(timeout=self.settings.delivery_deadline + 30)


def _advanced(run: alert_store.RunToEvaluate, last_step: int | None) -> alert_store.RunToEvaluate:
    from dataclasses import replace

    return replace(run, cursor=last_step, version=run.version + 1 if run.version >= 0 else 1)


MAX_DURATION_S = 3650 * 86400.0  # ten years: any longer is a typo (and past datetime's range)


def parse_duration(text: str) -> float:
    """Seconds in ``"2s"``, ``"500ms"``, ``"30m"``, ``"2h"``, ``"1d"``, ``"1h30m"`` or a
    bare number of seconds; at most ten years."""
    import re

    from monitor.errors import ConfigError

    raw = str(text).strip().lower()
    try:
        value = float(raw)
    except ValueError:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", raw)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", "", raw).strip():
            raise ConfigError(
                f"duration {text!r}: use e.g. 2s, 500ms, 30m, 2h, 1d or 1h30m"
            ) from None
        unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        value = sum(float(n) * unit[u] for n, u in parts)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"duration {text!r} must be a positive, finite time")
    if value > MAX_DURATION_S:
        raise ConfigError(f"duration {text!r} is too long: at most 3650d (ten years)")
    return value
