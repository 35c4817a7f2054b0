"""Every component id of the dashboard, in one place (pages and tests import them)."""

from __future__ import annotations

from typing import Any

# App shell
URL = "url"
PAGE = "page"
NAV = "nav"

# Runs page
RUNS_GRID = "runs-grid"
RUNS_COMPARE = "runs-compare"
RUNS_FILTER = "runs-filter"
RUNS_REFRESH = "runs-refresh"
RUNS_MSG = "runs-msg"

# Panels of charts (compare page: "cmp", run page: "run")
PANEL_CMP = "cmp"
PANEL_RUN = "run"


def graph(panel: str, chart: str) -> dict[str, Any]:
    """A chart of a panel (pattern-matching id: the panel's callbacks take them ALL)."""
    return {"type": "kl-graph", "panel": panel, "chart": chart}


def graph_all(panel: str) -> dict[str, Any]:
    from dash import ALL

    return {"type": "kl-graph", "panel": panel, "chart": ALL}


def chart_box(panel: str, chart: str) -> dict[str, Any]:
    """The box around a chart of a panel (hidden when no shown run has data for it)."""
    return {"type": "kl-chart-box", "panel": panel, "chart": chart}


def chart_box_all(panel: str) -> dict[str, Any]:
    from dash import ALL

    return {"type": "kl-chart-box", "panel": panel, "chart": ALL}


def panel_id(panel: str, name: str) -> str:
    """Per-panel controls: view, live, smooth, x, klaxis, interval, msg, permalink, status,
    empty (the lines naming the charts without data)."""
    return f"{panel}-{name}"


# Compare page
CMP_METRICS = "cmp-metrics"
CMP_SUMMARY = "cmp-summary"

# Run page
RUN_STEP = "run-step"
RUN_PREV = "run-prev"
RUN_NEXT = "run-next"
RUN_SAMPLES = "run-samples"
RUN_TOP_TOKENS = "run-top-tokens"
RUN_HEATMAP = "run-heatmap"
RUN_TIMELINE = "run-timeline"
RUN_ANN_TEXT = "run-ann-text"
RUN_ANN_STEP = "run-ann-step"
RUN_ANN_AUTHOR = "run-ann-author"
RUN_ANN_ADD = "run-ann-add"
RUN_ANN_LIST = "run-ann-list"
RUN_ANN_MSG = "run-ann-msg"
RUN_STEP_LINK = "run-step-link"
RUN_ID_STORE = "run-id"
# Run page: the drift vocabulary panel
VOCAB_SECTION = "vocab-section"
VOCAB_HEATMAP = "vocab-heatmap"
VOCAB_RANGE = "vocab-range"
VOCAB_ZOOM = "vocab-zoom"  # the KL chart's zoomed step range, None when not zoomed
VOCAB_STEP_A = "vocab-step-a"
VOCAB_STEP_B = "vocab-step-b"
VOCAB_WINDOW = "vocab-window"
VOCAB_CHANGES = "vocab-changes"
# Compare page: run A vs run B
CMP_VOCAB = "cmp-vocab"

# Alerts page
ALERTS_GRID = "alerts-grid"
ALERTS_STATE = "alerts-state"
ALERTS_ACK = "alerts-ack"
ALERTS_SILENCE = "alerts-silence"
ALERTS_SILENCE_FOR = "alerts-silence-for"
ALERTS_WHO = "alerts-who"
ALERTS_MSG = "alerts-msg"
ALERTS_INTERVAL = "alerts-interval"
