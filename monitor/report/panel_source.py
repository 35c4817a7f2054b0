"""The reads of the report's compare charts (``monitor.charts.panel.PanelSource``), straight
from the store: a report reads once, so nothing is cached, and its charts are over steps,
so there is no wall-time axis to place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from monitor.charts.markers import alert_marker_frame, note_marker_frame
from monitor.store import current_kl
from monitor.store import series as store_series
from monitor.store.alerts import event_markers
from monitor.store.database import Database
from monitor.store.domain import RunInfo
from monitor.store.drilldown import annotation_markers
from monitor.store.runs import get_run


@dataclass(frozen=True)
class _RunState:
    info: RunInfo


@dataclass
class StorePanelSource(store_series.SeriesReads):
    """A ``PanelSource`` on one database, for the runs of a report (the chart reads
    inherited)."""

    db: Database

    def run_state(self, run_id: int) -> _RunState:
        return _RunState(get_run(self.db, run_id))

    def best_kl(self, run_id: int) -> current_kl.KLQuantity | None:
        return current_kl.best_kl(self.db, run_id)

    def step_to_wall(self, run_id: int) -> tuple[np.ndarray, np.ndarray]:
        """No mapping: the report's charts have a step axis only."""
        return np.zeros(0), np.zeros(0)

    def alert_markers(self, run_ids: Sequence[int], limit: int = 200) -> pd.DataFrame:
        """The runs' latest ``limit`` alert episodes, newest first, at the step they fired
        (else went pending)."""
        rows = event_markers(self.db, run_ids, limit).itertuples(index=False, name=None)
        return alert_marker_frame(list(rows))

    def note_markers(self, run_ids: Sequence[int], limit: int = 500) -> pd.DataFrame:
        """At most ``limit`` annotations of the runs, by step."""
        notes = annotation_markers(self.db, run_ids, limit)
        return note_marker_frame((a.run_id, a.step, a.text, a.author) for a in notes)
