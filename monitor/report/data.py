"""What a post-mortem report shows, read once from the database: ``collect(db, refs, ...)``.

The renderers (``monitor.report.html``, ``monitor.report.markdown``) take the
``ReportData`` and never touch the database again, except the HTML one, which builds the
dashboard's own compare charts (``monitor.charts.panel.build_panel``) so that the report
shows exactly what the Compare page shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from monitor.errors import InvalidInput
from monitor.formats import number_text
from monitor.store.alerts import list_events
from monitor.store.database import Database
from monitor.store.domain import Annotation, RunInfo, Sample
from monitor.store.drilldown import list_annotations, worst_samples
from monitor.store.runs import resolve_run
from monitor.store.series import read_histogram_columns, read_series
from monitor.store.vocabulary import read_token_ledger, token_changes_between_runs

#: Step quantities the report reads for its charts and summary.
REPORT_COLUMNS: tuple[str, ...] = (
    "kl_mean",
    "kl_p05",
    "kl_p95",
    "k1",
    "k2",
    "k3",
    "neg_kl_frac",
    "reward_mean",
    "policy_nll",
    "entropy_mean",
    "resp_len_mean",
    "top1pct_share",
    "rollout_gap",
)
#: Buckets per run and chart: spikes survive (min/max per bucket), files stay small.
MAX_BUCKETS = 600
WORST_SAMPLES = 4
MAX_RUNS = 12


@dataclass
class RunSection:
    """One run of the report."""

    info: RunInfo
    label: str
    color: str
    #: Bucket means with q__min/q__max per quantity (Series.combined()), steps in range.
    series: pd.DataFrame
    level: int
    first_step: int | None
    last_step: int | None
    events: pd.DataFrame
    notes: list[Annotation]
    samples: list[Sample]
    hist_steps: np.ndarray
    hist_counts: np.ndarray
    #: The drift vocabulary of the range (``read_token_ledger``) and what grew from its first
    #: ``VOCAB_WINDOW`` steps to its last (``token_changes_between_runs``); empty without a
    #: token ledger.
    vocabulary: pd.DataFrame = field(default_factory=pd.DataFrame)
    vocabulary_changes: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def last(self) -> dict[str, float | None]:
        """The latest value of each quantity in the range (bucket mean at the end)."""
        out: dict[str, float | None] = {}
        for c in REPORT_COLUMNS:
            if c not in self.series:
                out[c] = None
                continue
            v = self.series[c].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            out[c] = float(v[-1]) if len(v) else None
        return out

    def summary_cells(self, text: Callable[[Any], str]) -> list[str]:
        """The run's line in a report's run table after its label: id, project, status,
        steps, last kl_mean, k3 and reward, alerts; ``text`` escapes the free-text cells."""
        last = self.last
        fired = len(self.events)
        still = int((self.events["state"] == "firing").sum()) if fired else 0
        return [
            str(self.info.id),
            text(self.info.project),
            text(self.info.status),
            f"{self.first_step}-{self.last_step}" if self.last_step is not None else "no steps",
            describe_value(last.get("kl_mean")),
            describe_value(last.get("k3")),
            describe_value(last.get("reward_mean")),
            f"{fired} ({still} still firing)" if fired else "none",
        ]


@dataclass
class ReportData:
    runs: list[RunSection]
    start: int | None
    end: int | None
    generated_at: float
    title: str
    db: Database | None = field(default=None, repr=False)

    @property
    def run_ids(self) -> list[int]:
        return [r.info.id for r in self.runs]

    def range_text(self) -> str:
        if self.start is None and self.end is None:
            return "all steps"
        lo = "first" if self.start is None else str(self.start)
        hi = "last" if self.end is None else str(self.end)
        return f"steps {lo} to {hi}"

    def config_table(self) -> pd.DataFrame:
        """Runs as columns, fields as rows (identity, latest numbers, tags, every config key),
        with ``differs``: True where the runs disagree."""
        from monitor.charts.tables import comparison_table

        return comparison_table(
            [
                {
                    "label": r.label,
                    "project": r.info.project,
                    "name": r.info.name,
                    "status": r.info.status,
                    "last_step": r.last_step,
                    "last_kl": r.last.get("kl_mean"),
                    "last_reward": r.last.get("reward_mean"),
                    "tags": r.info.tags,
                    "config": r.info.config,
                }
                for r in self.runs
            ]
        )


def parse_run_refs(text: str | Sequence[str]) -> list[str]:
    """``"A,B"`` (or a list) as run references, in order, without duplicates."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    refs = list(dict.fromkeys(p.strip() for p in parts if p and p.strip()))
    if not refs:
        raise InvalidInput("--runs: name at least one run (id or name), e.g. --runs 3,7")
    if len(refs) > MAX_RUNS:
        raise InvalidInput(f"--runs: at most {MAX_RUNS} runs in one report, got {len(refs)}")
    return refs


def _labels(infos: Sequence[RunInfo]) -> list[str]:
    names = [i.name for i in infos]
    return [i.name if names.count(i.name) == 1 else f"{i.project}/{i.name} ({i.id})" for i in infos]


def _events_in_range(events: pd.DataFrame, start: int | None, end: int | None) -> pd.DataFrame:
    """Episodes that overlap [start, end] and ever fired (pending-only ones are noise)."""
    if events.empty:
        return events
    ev = events[events["fired_step"].notna() | (events["state"] == "firing")]
    if start is not None:
        ends = ev["end_step"].astype("Float64").fillna(np.inf).astype(float)
        ev = ev[ends >= start]
    if end is not None:
        ev = ev[ev["start_step"].astype(float) <= end]
    return ev.sort_values(["start_step", "id"]).reset_index(drop=True)


def collect(
    db: Database,
    refs: str | Sequence[str],
    *,
    start: int | None = None,
    end: int | None = None,
    title: str | None = None,
    max_buckets: int = MAX_BUCKETS,
) -> ReportData:
    """Everything the report shows for the runs ``refs`` (ids or names) over [start, end]."""
    from monitor.charts.palette import run_color

    if start is not None and end is not None and start > end:
        raise InvalidInput(f"--from {start} is after --to {end}")
    infos = [resolve_run(db, ref) for ref in parse_run_refs(refs)]
    seen: dict[int, RunInfo] = {}
    for info in infos:
        seen.setdefault(info.id, info)
    infos = list(seen.values())
    labels = _labels(infos)
    events = list_events(db, run_id=[i.id for i in infos], limit=None)
    sections = []
    for i, (info, label) in enumerate(zip(infos, labels, strict=True)):
        s = read_series(db, info.id, REPORT_COLUMNS, start=start, end=end, max_buckets=max_buckets)
        steps, counts = read_histogram_columns(db, info.id, start=start, end=end, max_columns=300)
        notes = [
            a
            for a in list_annotations(db, info.id)
            if (start is None or a.step >= start) and (end is None or a.step <= end)
        ]
        run_events = _events_in_range(events[events["run_id"] == info.id], start, end)
        fired = run_events["fired_step"].dropna().astype(int).tolist() if len(run_events) else []
        sections.append(
            RunSection(
                info=info,
                label=label,
                color=run_color(i),
                series=s.combined(),
                level=s.level,
                first_step=s.first_step if start is None else max(start, s.first_step or 0),
                last_step=s.last_step,
                events=run_events,
                notes=notes,
                samples=worst_samples(db, info.id, start, end, WORST_SAMPLES, alert_steps=fired),
                hist_steps=steps,
                hist_counts=counts,
                **_vocabulary(db, info.id, start, end, s.first_step, s.last_step),
            )
        )
    if title is None:
        title = "klmon post-mortem: " + " vs ".join(labels)
    return ReportData(sections, start, end, time.time(), title, db)


#: Tokens in a run's drift vocabulary table, and the steps at each end of the range whose
#: vocabularies the "what grew" table compares.
VOCAB_TOKENS = 10
VOCAB_WINDOW = 20


def _vocabulary(
    db: Database,
    run_id: int,
    start: int | None,
    end: int | None,
    first: int | None,
    last: int | None,
) -> dict[str, pd.DataFrame]:
    top = read_token_ledger(db, run_id, start, end, k=VOCAB_TOKENS)
    if top.empty or first is None or last is None:
        return {"vocabulary": top, "vocabulary_changes": pd.DataFrame()}
    lo = first if start is None else max(start, first)
    hi = last if end is None else min(end, last)
    if hi < lo:
        return {"vocabulary": top, "vocabulary_changes": pd.DataFrame()}
    first = (lo, lo + VOCAB_WINDOW - 1)
    final = (max(lo, hi - VOCAB_WINDOW + 1), hi)
    changes = token_changes_between_runs(db, run_id, first, run_id, final, k=VOCAB_TOKENS)
    return {"vocabulary": top, "vocabulary_changes": changes}


#: The drift vocabulary section of a report, in both formats: its introduction, the message
#: for a run without a ledger and the headers of its token table.
VOCAB_INTRO = (
    "Which tokens carry log p - log q over every token of the batches (the token ledger): "
    "each token's share of the range's positive log-ratio mass, and the tokens whose "
    f"log-ratio per 1k tokens grew most from the range's first {VOCAB_WINDOW} steps to "
    f"its last {VOCAB_WINDOW}."
)
NO_LEDGER = "No token ledger (the run was logged without token_ids)."
VOCAB_HEADERS = ("token", "share of positive log-ratio", "count", "sum", "steps")


def vocabulary_rows(
    section: RunSection, token: Callable[[str, bool], str], text: Callable[[Any], str]
) -> tuple[list[list[str]], list[list[str]]]:
    """A run's drift vocabulary as table cells: its top tokens (:data:`VOCAB_HEADERS`) and
    what grew (``charts.tables.CHANGE_HEADERS``). ``token(shown, special)`` renders a token,
    ``text`` escapes the other cells for the output format."""
    from monitor.charts.tables import CHANGE_HEADERS, token_change_rows
    from monitor.formats import show_token

    top = []
    for v in section.vocabulary.to_dict(orient="records"):
        shown = show_token(v["token"], v["token_id"])
        top.append(
            [
                token(shown.text, shown.special),
                text(f"{v['share_pos']:.1%}"),
                text(v["count"]),
                text(f"{v['lr_sum']:.4g}"),
                text(v["n_steps"]),
            ]
        )
    grew = [
        [token(c["token"], c["special"]), *(text(c[k]) for k, _ in CHANGE_HEADERS[1:])]
        for c in token_change_rows(section.vocabulary_changes)
    ]
    return top, grew


def describe_value(value: Any, digits: int = 4) -> str:
    """A number for a table: ``-`` when missing, else ``digits`` significant digits."""
    return number_text(value, digits)


def describe_step(value: Any) -> str:
    """A step for a table: ``-`` when missing."""
    if value is None or pd.isna(value):
        return "-"
    return str(int(value))


#: The columns of a report's alert table, in the order :func:`event_cells` gives them.
EVENT_TABLE_HEADERS = (
    "rule",
    "severity",
    "state",
    "pending at",
    "fired at",
    "resolved at",
    "value",
    "peak",
    "message",
)


def event_cells(
    e: Any, text: Callable[[Any], str], severity: Callable[[Any], str] | None = None
) -> list[str]:
    """One alert episode as the cells of :data:`EVENT_TABLE_HEADERS`. ``text`` escapes the
    free-text cells for the output format (``severity``, when given, renders that one)."""
    return [
        text(e.rule),
        (severity or text)(e.severity),
        text(e.state),
        describe_step(e.start_step),
        describe_step(e.fired_step),
        describe_step(e.end_step),
        describe_value(e.value),
        describe_peak(e.peak_value, e.peak_step),
        text(e.message),
    ]


def describe_peak(value: Any, step: Any) -> str:
    """An alert episode's peak for a table: ``17.76 at step 70``, ``-`` when unknown."""
    if value is None or step is None or pd.isna(step) or describe_value(value) == "-":
        return "-"
    return f"{describe_value(value)} at step {int(step)}"


def carrier_tokens(cells: Sequence[Any], n: int = 5) -> list[tuple[str, int, float, float, float]]:
    """The tokens that carry a sample's KL: (token, uses, mean log p, mean log q, summed
    log p - log q), largest |sum| first; the sums over all tokens add up to the sequence KL."""
    groups: dict[str, list[Any]] = {}
    for c in cells:
        groups.setdefault(c.text, []).append(c)
    rows = [
        (
            text,
            len(cs),
            float(np.mean([c.logp for c in cs])),
            float(np.mean([c.logq for c in cs])),
            float(np.sum([c.diff for c in cs])),
        )
        for text, cs in groups.items()
    ]
    rows.sort(key=lambda r: -abs(r[4]))
    return rows[:n]
