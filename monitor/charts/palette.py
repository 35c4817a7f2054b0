"""The colours and line styles every chart uses, so a run keeps its colour from the
dashboard to the report and the alert email."""

from __future__ import annotations

PALETTE: tuple[str, ...] = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#17becf",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
)
DASHES = ("solid", "dot", "dash", "longdash", "dashdot")
#: Alert severities as colours (the alert timelines, plotly and matplotlib alike).
SEVERITY_COLORS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}


def run_color(index: int) -> str:
    """The colour of the index-th run of a comparison (the same on every chart)."""
    return PALETTE[index % len(PALETTE)]
