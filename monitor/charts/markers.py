"""Alert and note markers of the time charts as the frame ``figures.time_chart`` draws:
columns run_id, step, kind ("alert" | "note"), text. Whoever reads the rows (the
dashboard's cached reads, the report's store reads) builds the frame here, so a marker says
the same on a page and in a report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

MARKER_COLUMNS = ["run_id", "step", "kind", "text"]


def alert_marker_frame(rows: Iterable[tuple[Any, ...]]) -> pd.DataFrame:
    """Markers of alert episodes from rows (run_id, step where it fired else went pending,
    rule, severity, state, message)."""
    rows = list(rows)
    return pd.DataFrame(
        {
            "run_id": [int(r[0]) for r in rows],
            "step": [int(r[1]) for r in rows],
            "kind": "alert",
            "text": [f"{r[2]} ({r[3]}, {r[4]}) at step {int(r[1])}: {r[5]}" for r in rows],
        },
        columns=MARKER_COLUMNS,
    )


def note_marker_frame(rows: Iterable[tuple[Any, ...]]) -> pd.DataFrame:
    """Markers of annotations from rows (run_id, step, text, author)."""
    rows = list(rows)
    return pd.DataFrame(
        {
            "run_id": [int(r[0]) for r in rows],
            "step": [int(r[1]) for r in rows],
            "kind": "note",
            "text": [
                f"note at step {int(r[1])}" + (f" by {r[3]}" if r[3] else "") + f": {r[2]}"
                for r in rows
            ],
        },
        columns=MARKER_COLUMNS,
    )
