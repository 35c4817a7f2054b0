"""The dashboard's data layer: every read and write the pages make, with a short per-process
cache. One ``DashboardData`` per app (never a module global), so several gunicorn workers
can serve one database; the cache only saves repeated reads within a few seconds.

Errors: store functions raise klmon errors; ``user_message`` turns any exception into a
sentence safe to show (never the database URL, never a traceback).
"""

from __future__ import annotations

import logging
import math
import operator
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from monitor.analytics.stall import STALL_FACTOR, STALL_MIN_SECONDS, is_stalled
from monitor.charts.markers import alert_marker_frame, note_marker_frame
from monitor.charts.tables import sparkline, vocabulary_line
from monitor.errors import (
    ConfigError,
    DatabaseUnavailable,
    InvalidInput,
    KlmonError,
    NotFound,
)
from monitor.store import (
    RECENT_STEPS,
    Annotation,
    CurrentKL,
    Database,
    KLQuantity,
    RunInfo,
    Sample,
    add_annotation,
    annotation_markers,
    annotations_frame,
    described_metric_names,
    event_markers,
    get_runs,
    latest_steps,
    nearest_sample_step,
    open_event_counts,
    read_metric_info,
    read_samples,
    recent_walls,
    run_summaries,
    sample_step_range,
)
from monitor.store import current_kl as kl_store
from monitor.store import series as store_series

log = logging.getLogger("monitor.dashboard")
T = TypeVar("T")

#: Longest text accepted from a form field (annotation text has its own limit in the store).
MAX_FIELD = 200


def user_message(exc: BaseException) -> str:
    """A message about ``exc`` that is safe to show in a page."""
    if isinstance(exc, NotFound | InvalidInput | ConfigError):
        return str(exc)
    if isinstance(exc, DatabaseUnavailable):
        return "The database is unavailable right now; the page will retry."
    if isinstance(exc, KlmonError):
        log.warning("dashboard: %s", exc)
        return "The database could not answer this request (details are in the server log)."
    log.exception("dashboard: unexpected error", exc_info=exc)
    return "Something went wrong on the server (details are in the server log)."


def derive_status(
    status: str,
    last_seen_at: float | None,
    last_wall: float | None,
    median_interval: float | None,
    now: float,
    *,
    factor: float = STALL_FACTOR,
    min_seconds: float = STALL_MIN_SECONDS,
) -> str:
    """running | stalled | finished | crashed, the stall judged by
    :func:`monitor.analytics.stall.is_stalled` on the last time the run was heard from."""
    if status != "running":
        return status
    heard = max(
        (t for t in (last_seen_at, last_wall) if t is not None and np.isfinite(t)), default=None
    )
    if heard is None:
        return "running"
    silent = now - heard
    stalled = is_stalled(silent, median_interval, factor=factor, min_seconds=min_seconds)
    return "stalled" if stalled else "running"


_MISS = object()


class _TTLCache:
    """A small LRU with expiry; thread-safe (Flask serves callbacks from threads)."""

    def __init__(self, maxsize: int = 512) -> None:
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._maxsize = maxsize

    def get(self, key: Hashable, ttl: float, compute: Callable[[], T]) -> T:
        now = time.monotonic()
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and hit[0] > now:
                self._data.move_to_end(key)
                return hit[1]
        value = compute()
        with self._lock:
            self._data[key] = (now + ttl, value)
            self._data.move_to_end(key)
            while len(self._data) > self._maxsize:
                self._data.popitem(last=False)
        return value

    def peek(self, key: Hashable) -> Any:
        """The cached value, or _MISS."""
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
        return _MISS

    def put(self, key: Hashable, ttl: float, value: Any) -> None:
        with self._lock:
            self._data[key] = (time.monotonic() + ttl, value)
            while len(self._data) > self._maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


@dataclass(frozen=True)
class RunState:
    """What the header of a run shows: derived status and the latest numbers."""

    info: RunInfo
    status: str
    last_step: int | None
    last_wall: float | None
    last: dict[str, float]
    median_interval: float | None


RUN_OVERVIEW_COLUMNS = [
    "id",
    "project",
    "name",
    "status",
    "source",
    "tags",
    "last_step",
    "last_update",
    "last_kl",
    "kl_quantity",
    "last_reward",
    "open_alerts",
    "kl_trend",
]
_STATE_ROWS = RECENT_STEPS  # latest step rows: a run's last values and step interval
_SPARK_BUCKETS = 12  # the Runs page sparkline: at most 24 points
HEADLINE_COLUMNS = (
    "kl_mean",
    "kl_p95",
    "k3",
    "neg_kl_frac",
    "reward_mean",
    "resp_len_mean",
    "policy_nll",
    "top1pct_share",
)


class DashboardData(store_series.SeriesReads):
    """Reads and writes for the pages, on one ``Database`` (the chart reads inherited)."""

    def __init__(
        self,
        db: Database,
        *,
        stall_factor: float = STALL_FACTOR,
        stall_min_seconds: float = STALL_MIN_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.stall_factor = stall_factor
        self.stall_min_seconds = stall_min_seconds
        self.clock = clock
        self._cache = _TTLCache()

    def clear_cache(self) -> None:
        self._cache.clear()

    # ----------------------------------------------------------------------- runs

    def run(self, run_id: int) -> RunInfo:
        found, _ = self.runs([run_id])
        if not found:
            raise NotFound(f"run {int(run_id)} does not exist")
        return found[0]

    def runs(self, run_ids: Iterable[int]) -> tuple[list[RunInfo], list[str]]:
        """The runs that exist (in the order asked), and a message for each id that does not."""
        ids = [int(r) for r in run_ids]
        infos: dict[int, RunInfo | None] = {}
        for rid in ids:
            hit = self._cache.peek(("run", rid))
            if hit is not _MISS:
                infos[rid] = hit
        todo = [r for r in ids if r not in infos]
        if todo:
            read = self._read_runs(todo)
            for rid in todo:
                infos[rid] = read.get(rid)
                self._cache.put(("run", rid), 2.0, infos[rid])
        found = [info for r in ids if (info := infos.get(r)) is not None]
        missing = [f"run {r} does not exist" for r in ids if infos.get(r) is None]
        return found, missing

    def _read_runs(self, ids: Sequence[int]) -> dict[int, RunInfo]:
        return get_runs(self.db, ids)

    def run_state(self, run_id: int) -> RunState:
        return self._cache.get(("state", int(run_id)), 1.0, lambda: self._run_state(int(run_id)))

    def _run_state(self, run_id: int) -> RunState:
        info = self.run(run_id)
        rows = list(
            latest_steps(self.db, run_id, HEADLINE_COLUMNS, limit=_STATE_ROWS).itertuples(
                index=False, name=None
            )
        )
        return self._state_from_rows(info, rows)

    def _state_from_rows(self, info: RunInfo, rows: Sequence[Sequence[Any]]) -> RunState:
        """A run's state from its latest step rows (step, wall_time, HEADLINE_COLUMNS),
        newest first: the last value of each headline column and the median step interval."""
        last: dict[str, float] = {}
        last_step = last_wall = None
        if rows:
            last_step, last_wall = int(rows[0][0]), float(rows[0][1])
            for j, c in enumerate(HEADLINE_COLUMNS):
                v = next((r[2 + j] for r in rows if r[2 + j] is not None), None)
                if v is not None:
                    last[c] = float(v)
        median = _median_interval(rows)
        status = self._status(info.status, info.last_seen_at, last_wall, median)
        return RunState(info, status, last_step, last_wall, last, median)

    def _status(
        self,
        status: str,
        last_seen_at: float | None,
        last_wall: float | None,
        median: float | None,
    ) -> str:
        return derive_status(
            status,
            last_seen_at,
            last_wall,
            median,
            self.clock(),
            factor=self.stall_factor,
            min_seconds=self.stall_min_seconds,
        )

    def best_kl(self, run_id: int) -> KLQuantity | None:
        """The run's best available KL quantity (monitor.store.current_kl), cached."""
        return self._cache.get(
            ("bestkl", int(run_id)), 10.0, lambda: kl_store.best_kl(self.db, run_id)
        )

    def current_kl(self, run_id: int) -> CurrentKL | None:
        """The latest value of the run's best KL quantity, with which quantity it is."""
        return self._cache.get(
            ("curkl", int(run_id)), 2.0, lambda: kl_store.current_kl(self.db, int(run_id))
        )

    def runs_overview(self) -> pd.DataFrame:
        """Every run with derived status, last step and update, current KL (its best KL
        quantity's latest value, ``kl_quantity`` saying which and its unit) and reward, open
        alerts and a sparkline of that KL. Columns: RUN_OVERVIEW_COLUMNS."""
        return self._cache.get(("overview",), 3.0, self._runs_overview)

    def _runs_overview(self) -> pd.DataFrame:
        # A constant number of reads whatever the number of runs and their length: the run
        # list (the counters with the step rows they point at: last wall time, current KL,
        # last reward), the wall times of the latest steps of the runs still running, kept on
        # runs by the writers (their step interval tells a stall), the open alerts and the
        # sparklines from coarse rollups.
        summaries = run_summaries(self.db)
        running = [r["id"] for r in summaries if r["status"] == "running"]
        latest = recent_walls(self.db, running)
        open_alerts = open_event_counts(self.db)
        kl_column = {
            r["id"]: _kl_column(r["kl_quantity"])
            for r in summaries
            if r["last_kl"] is not None and r["last_step"] is not None
        }
        trends = store_series.read_sparklines(self.db, kl_column, max_buckets=_SPARK_BUCKETS)
        records = []
        for rec in summaries:
            rid = rec["id"]
            has_kl = rid in kl_column
            status = self._status(
                rec["status"],
                rec["last_seen_at"],
                rec["last_wall"],
                _median_interval(latest.get(rid, [])),
            )
            records.append(
                {
                    "id": rid,
                    "project": rec["project"],
                    "name": rec["name"],
                    "status": status,
                    "source": rec["source"],
                    "tags": ", ".join(str(t) for t in rec["tags"]),
                    "last_step": rec["last_step"],
                    "last_update": max(
                        (t for t in (rec["last_wall"], rec["last_seen_at"]) if t is not None),
                        default=None,
                    ),
                    "last_kl": rec["last_kl"] if has_kl else None,
                    "kl_quantity": _kl_label(rec) if has_kl else None,
                    "last_reward": rec["last_reward"],
                    "open_alerts": int(open_alerts.get(rid, 0)),
                    "kl_trend": sparkline(trends[rid]) if rid in trends else "",
                }
            )
        return pd.DataFrame(records, columns=RUN_OVERVIEW_COLUMNS)

    # ----------------------------------------------------------------------- series

    def rows_after(
        self, run_id: int, after: int, columns: Sequence[str], limit: int
    ) -> pd.DataFrame:
        return store_series.read_step_rows_after(self.db, run_id, after, columns, limit=limit)

    def metric_rows_after(self, run_id: int, name: str, after: int, limit: int) -> pd.DataFrame:
        return store_series.read_metric_rows_after(self.db, run_id, name, after, limit=limit)

    def metric_names(self, run_ids: Sequence[int]) -> list[str]:
        """Extra metric names of any of the runs (sorted)."""

        def compute() -> list[str]:
            return described_metric_names(self.db, run_ids)

        return self._cache.get(("mnames", tuple(run_ids)), 10.0, compute)

    def metric_info(self, run_ids: Sequence[int]) -> dict[str, dict[str, Any]]:
        """What each extra metric means (metric_info: source, quantity, estimator, scale,
        description), by name; the first run that describes a name wins."""

        def compute() -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for rid in run_ids:
                for name, info in read_metric_info(self.db, rid).items():
                    out.setdefault(
                        name,
                        {
                            "source": info.source,
                            "quantity": info.quantity,
                            "estimator": info.estimator,
                            "scale": info.scale,
                            "description": info.description,
                        },
                    )
            return out

        return self._cache.get(("minfo", tuple(run_ids)), 10.0, compute)

    def step_to_wall(self, run_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps, wall times) at about 64 points of the run, to place step markers on a
        wall-time axis and to turn a wall-time zoom into steps."""

        def compute() -> tuple[np.ndarray, np.ndarray]:
            s = self.series(run_id, ["kl_mean"], max_buckets=64).combined()
            if s.empty:
                return np.zeros(0), np.zeros(0)
            steps = np.r_[s["step"].to_numpy(float), s["step_end"].to_numpy(float)]
            walls = np.r_[s["wall_min"].to_numpy(float), s["wall_max"].to_numpy(float)]
            ok = np.isfinite(walls)
            order = np.argsort(steps[ok], kind="stable")
            return steps[ok][order], walls[ok][order]

        return self._cache.get(("s2w", int(run_id)), 5.0, compute)

    def histograms(
        self,
        run_id: int,
        *,
        start: int | None = None,
        end: int | None = None,
        max_columns: int = 400,
    ) -> tuple[np.ndarray, np.ndarray]:
        return store_series.read_histogram_columns(
            self.db, run_id, start=start, end=end, max_columns=max_columns
        )

    # ----------------------------------------------------------------------- alerts

    def events(
        self,
        *,
        run_ids: Sequence[int] | None = None,
        state: str | Sequence[str] | None = None,
        limit: int = 500,
    ) -> pd.DataFrame:
        """Alert episodes, newest first (monitor.store.alerts.list_events)."""
        from monitor.store import list_events

        return list_events(
            self.db, run_id=list(run_ids) if run_ids is not None else None, state=state, limit=limit
        )

    def acknowledge(self, event_ids: Sequence[int], by: str) -> int:
        from monitor.store import acknowledge_event

        for eid in event_ids:
            acknowledge_event(self.db, int(eid), by)
        self.clear_cache()
        return len(event_ids)

    def silence(self, pairs: Sequence[tuple[int, str]], seconds: float, by: str) -> int:
        """Silence each (run, rule) for ``seconds``."""
        from monitor.store import silence

        until = self.clock() + seconds
        done = set()
        for run_id, rule in pairs:
            if (run_id, rule) in done:
                continue
            silence(self.db, int(run_id), rule, until, by=by, reason="from the dashboard")
            done.add((run_id, rule))
        self.clear_cache()
        return len(done)

    def alert_markers(self, run_ids: Sequence[int], limit: int = 200) -> pd.DataFrame:
        """The runs' latest alert episodes as chart markers: run_id, step (where it fired,
        else went pending), kind ("alert"), text. A lean read of alert_events: it runs on
        every chart render."""
        rows = event_markers(self.db, run_ids, limit).itertuples(index=False, name=None)
        return alert_marker_frame(list(rows))

    # ----------------------------------------------------------------------- drill-down

    def annotations(self, run_ids: Sequence[int]) -> pd.DataFrame:
        return annotations_frame(self.db, list(run_ids))

    def note_markers(self, run_ids: Sequence[int], limit: int = 500) -> pd.DataFrame:
        """The runs' annotations as chart markers: run_id, step, kind ("note"), text."""
        notes = annotation_markers(self.db, run_ids, limit)
        return note_marker_frame((a.run_id, a.step, a.text, a.author) for a in notes)

    def add_annotation(self, run_id: int, step: int, text_: str, author: str | None) -> Annotation:
        if author is not None and len(author) > MAX_FIELD:
            raise InvalidInput(f"author is longer than {MAX_FIELD} characters")
        ann = add_annotation(self.db, run_id, step, text_, author=author or None)
        self.clear_cache()
        return ann

    def samples(self, run_id: int, step: int) -> list[Sample]:
        return read_samples(self.db, run_id, step)

    def sample_step(self, run_id: int, step: int | None, direction: int = 0) -> int | None:
        """A step with stored samples: the nearest to ``step`` (``direction`` 0; the latest
        when ``step`` is None), the last before it (-1) or the first after it (+1). Index
        lookups: a run may hold samples at a million steps."""
        return nearest_sample_step(self.db, run_id, step, direction)

    def sample_step_range(self, run_id: int) -> tuple[int | None, int | None]:
        return sample_step_range(self.db, run_id)

    # ----------------------------------------------------------------------- drift vocabulary

    def vocabulary_buckets(
        self, run_id: int, start: int, end: int, n_buckets: int = 40, k: int = 16
    ) -> pd.DataFrame:
        """The range's top ``k`` tokens per step bucket (``read_token_ledger_buckets``)."""
        from monitor.store import read_token_ledger_buckets

        return self._cache.get(
            ("vbuckets", int(run_id), int(start), int(end), n_buckets, k),
            3.0,
            lambda: read_token_ledger_buckets(self.db, int(run_id), start, end, n_buckets, k),
        )

    def vocabulary_changes(
        self, run_id: int, step_a: int, step_b: int, window: int = 1, k: int = 20
    ) -> pd.DataFrame:
        """Tokens ranked by the growth of their contribution from step A to step B
        (``token_changes``)."""
        from monitor.store import token_changes

        return token_changes(self.db, int(run_id), int(step_a), int(step_b), window, k)

    def vocabulary_note(self, run_id: int, step: int) -> str:
        """One line on the tokens that carry the log-ratio at ``step`` and what grew since the
        warm-up (``vocabulary_line`` of ``step_vocabulary``); '' without a ledger there."""
        from monitor.store import step_vocabulary

        def compute() -> str:
            v = step_vocabulary(self.db, int(run_id), int(step))
            return vocabulary_line(v.top, v.changes)

        return self._cache.get(("vnote", int(run_id), int(step)), 30.0, compute)

    def vocabulary_changes_between_runs(
        self,
        run_a: int,
        range_a: tuple[int | None, int | None],
        run_b: int,
        range_b: tuple[int | None, int | None],
        k: int = 20,
    ) -> pd.DataFrame:
        """Tokens ranked by how much more of run B's log-ratio they carry than of run A's
        (``token_changes_between_runs``)."""
        from monitor.store import token_changes_between_runs

        return self._cache.get(
            ("vruns", int(run_a), tuple(range_a), int(run_b), tuple(range_b), k),
            3.0,
            lambda: token_changes_between_runs(
                self.db, int(run_a), range_a, int(run_b), range_b, k
            ),
        )


def _median_interval(rows: Sequence[Sequence[Any]]) -> float | None:
    """The median step interval (seconds) of a run's latest step rows (step, wall_time, ...),
    newest first; None with fewer than two. Gaps that are not finite or go back in time are
    left out. Plain Python: the Runs page takes it for every running run, where numpy's
    per-call overhead on 20 gaps cost more than reading them."""
    walls = [math.nan if r[1] is None else float(r[1]) for r in rows]
    gaps = [g for g in map(operator.sub, walls, walls[1:]) if math.isfinite(g) and g >= 0]
    return statistics.median(gaps) if gaps else None


def _kl_column(quantity_name: str) -> str:
    """The step column of a ``KLQuantity.name`` (``k3`` of ``k3 from kl``)."""
    return quantity_name.split(" from ", 1)[0]


def _kl_label(summary: dict[str, Any]) -> str:
    """``KLQuantity.label()`` of a run summary's current KL."""
    return KLQuantity(
        _kl_column(summary["kl_quantity"]), summary["kl_quantity"].partition(" from ")[2] or None
    ).label()
