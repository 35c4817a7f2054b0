"""Alert evaluation state: per-run cursors, per-(run, rule) states and episodes, committed
with a compare-and-set on the run's cursor version."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import IntegrityError

from monitor.errors import StoreError
from monitor.store.alerts.domain import (
    EventDraft,
    LostRace,
    RuleStateDraft,
    RunToEvaluate,
    draft_from_row,
)
from monitor.store.database import Database
from monitor.store.models import (
    AlertCursorRow,
    AlertEventRow,
    AlertStateRow,
    RunRow,
)
from monitor.store.steps import read_steps
from monitor.store.tables import steps

# --------------------------------------------------------------------------- evaluation


def runs_to_evaluate(db: Database, run_ids: Sequence[int] | None = None) -> list[RunToEvaluate]:
    """Every run (or those of ``run_ids``) with its cursor and its highest stored step.

    The highest step is one index lookup per run (the steps primary key), so this costs the
    same whether a run has 1k or 10M steps.
    """
    max_step = select(func.max(steps.c.step)).where(steps.c.run_id == RunRow.id).scalar_subquery()
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
                event=draft_from_row(ev) if ev is not None else None,
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
    except LostRace:
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
        raise LostRace()


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None
