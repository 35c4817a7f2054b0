"""Charts as PNG bytes (matplotlib Agg, no display), for whatever must carry an image on its
own: the Markdown report, an incident doc, a ticket, an alert email.

The report's charts are the dashboard's (``monitor.charts.specs.CHARTS``: same titles, axes
and lines), drawn from bucket means with each bucket's min-max as a faint envelope, so a
one-step spike in a long run still shows. ``kl_chart_png`` is the alert email's small KL
chart around the step an alert fired at.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from monitor.charts.palette import SEVERITY_COLORS

#: The alert email chart's line at the step the alert is about.
FOCUS_COLOR = "#ff7f0e"


class ChartRun(Protocol):
    """One run as the report's charts draw it (``monitor.report.data.RunSection``)."""

    @property
    def label(self) -> str: ...
    @property
    def color(self) -> str: ...
    @property
    def series(self) -> pd.DataFrame:
        """Bucket means with q__min/q__max per quantity, columns step and step_end."""
        ...

    @property
    def level(self) -> int: ...
    @property
    def last_step(self) -> int | None: ...
    @property
    def events(self) -> pd.DataFrame:
        """Alert episodes: rule, severity, start_step, fired_step, end_step."""
        ...

    @property
    def notes(self) -> Sequence[Any]:
        """Annotations (anything with a ``step``)."""
        ...


DASH_STYLES = {"solid": "-", "dot": ":", "dash": "--", "longdash": "-.", "dashdot": "-."}
DPI = 110


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _values(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame:
        return np.full(len(frame), np.nan)
    return frame[column].to_numpy(dtype=float)


def _x(frame: pd.DataFrame) -> np.ndarray:
    """Bucket centres (raw rows: the step)."""
    return (frame["step"].to_numpy(dtype=float) + frame["step_end"].to_numpy(dtype=float)) / 2


def has_data(sections: Sequence[ChartRun], columns: Sequence[str]) -> bool:
    return any(np.isfinite(_values(s.series, c)).any() for s in sections for c in columns)


def _markers(ax, sections: Sequence[ChartRun]) -> None:
    """Alert firings as triangles at the foot of the chart, notes as dotted lines."""
    for s in sections:
        if not s.events.empty:
            steps = (
                s.events["fired_step"]
                .astype("Float64")
                .fillna(s.events["start_step"].astype("Float64"))
            )
            xs = steps.astype(float).to_numpy()
            ax.plot(
                xs,
                np.zeros(len(xs)),
                linestyle="none",
                marker="^",
                markersize=7,
                color=s.color,
                markeredgecolor="#333",
                transform=ax.get_xaxis_transform(),
                clip_on=False,
                zorder=5,
            )
        for note in s.notes:
            ax.axvline(note.step, color="#777", linestyle=":", linewidth=1)


def time_chart_png(
    title: str,
    y_title: str,
    lines: Sequence[tuple[str, str, str]],
    sections: Sequence[ChartRun],
    *,
    band: tuple[str, str] | None = None,
) -> bytes:
    """One chart over steps: ``lines`` are (column, label, dash) drawn for every run."""
    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot()
    many = len(lines) > 1
    for s in sections:
        f = s.series
        if f.empty:
            continue
        x = _x(f)
        if band is not None:
            lo, hi = _values(f, band[0]), _values(f, band[1])
            ok = np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                ax.fill_between(x[ok], lo[ok], hi[ok], color=s.color, alpha=0.15, linewidth=0)
        for column, label, dash in lines:
            y = _values(f, column)
            if not np.isfinite(y).any():
                continue
            if s.level > 0:
                ax.fill_between(
                    x,
                    _values(f, f"{column}__min"),
                    _values(f, f"{column}__max"),
                    color=s.color,
                    alpha=0.12,
                    linewidth=0,
                )
            ax.plot(
                x,
                y,
                DASH_STYLES.get(dash, "-"),
                color=s.color,
                linewidth=1.3,
                label=f"{s.label} · {label}" if many else s.label,
            )
    _markers(ax, sections)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("step")
    ax.set_ylabel(y_title, fontsize=8)
    ax.grid(color="#eee")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


def frontier_png(sections: Sequence[ChartRun], title: str, y_title: str, x_title: str) -> bytes:
    """Reward against sqrt(KL) per run, in step order."""
    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot()
    for s in sections:
        kl, rw = _values(s.series, "kl_mean"), _values(s.series, "reward_mean")
        ok = np.isfinite(kl) & np.isfinite(rw)
        if ok.any():
            ax.plot(
                np.sqrt(np.maximum(kl[ok], 0)),
                rw[ok],
                "-o",
                markersize=2,
                linewidth=0.8,
                color=s.color,
                label=s.label,
            )
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(x_title, fontsize=8)
    ax.set_ylabel(y_title, fontsize=8)
    ax.grid(color="#eee")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _png(fig)


def alert_timeline_png(sections: Sequence[ChartRun]) -> bytes:
    """Every run's alert episodes as bars from the step they went pending to the step they
    resolved (or the run's last step while open), one row per (run, rule)."""
    rows: list[tuple[str, float, float, str]] = []
    for s in sections:
        for e in s.events.itertuples(index=False):
            start = float(e.start_step)
            end = e.end_step
            stop = (
                float(end) if end is not None and not pd.isna(end) else float(s.last_step or start)
            )
            rows.append((f"{s.label} · {e.rule}", start, max(stop - start, 1.0), str(e.severity)))
    fig = Figure(figsize=(9, max(1.6, 0.8 + 0.32 * len({r[0] for r in rows}))))
    ax = fig.add_subplot()
    labels = list(dict.fromkeys(r[0] for r in rows))
    for label, start, width, severity in rows:
        ax.barh(
            labels.index(label),
            width,
            left=start,
            height=0.6,
            color=SEVERITY_COLORS.get(severity, "#7f7f7f"),
        )
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("step")
    ax.set_title(
        "Alert timeline (red critical, orange warning, blue info)" if rows else "No alerts fired",
        fontsize=10,
        loc="left",
    )
    ax.grid(axis="x", color="#eee")
    return _png(fig)


def kl_chart_png(
    steps: pd.DataFrame,
    *,
    focus_step: int | None,
    threshold: float | None = None,
    title: str = "",
) -> bytes | None:
    """A small PNG of the run's KL around ``focus_step`` (matplotlib Agg, no display).

    Draws the series ``monitor.analytics.pick_kl`` picks, its p05-p95 band when the series
    is ``kl_mean`` and the band is logged, a marker at the focus step and the threshold.
    """
    from monitor.analytics import pick_kl

    if steps is None or steps.empty:
        return None
    series = pick_kl(steps)
    if series is None:
        return None
    x = steps["step"].to_numpy(dtype=float)
    y = pd.to_numeric(steps[series], errors="coerce").to_numpy(dtype=float)
    fig = Figure(figsize=(6.4, 2.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if series == "kl_mean" and {"kl_p05", "kl_p95"} <= set(steps.columns):
        lo = pd.to_numeric(steps["kl_p05"], errors="coerce").to_numpy(dtype=float)
        hi = pd.to_numeric(steps["kl_p95"], errors="coerce").to_numpy(dtype=float)
        if np.isfinite(lo).any() and np.isfinite(hi).any():
            ax.fill_between(x, lo, hi, color="#1f77b4", alpha=0.15, linewidth=0, label="p05-p95")
    ax.plot(x, y, color="#1f77b4", linewidth=1.4, label=series)
    if threshold is not None and math.isfinite(threshold):
        ax.axhline(threshold, color="#d62728", linestyle="--", linewidth=1, label="threshold")
    if focus_step is not None:
        ax.axvline(focus_step, color=FOCUS_COLOR, linewidth=1, label=f"step {focus_step}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{series} (nats)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
