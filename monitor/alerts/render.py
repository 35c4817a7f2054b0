"""What a notification says: subject, plain text, HTML with an inline KL chart, webhook JSON.

Pure functions of the run, its episodes and a few rows of data; the engine gathers those.
Everything that comes from a run (names, messages, sample text, tokens) is HTML-escaped in
the HTML part and stripped of control characters where it reaches a mail header.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from monitor.alerts.rules import SEVERITY_RANK
from monitor.charts.tables import vocabulary_line
from monitor.formats import number_text, token_label
from monitor.store.alerts import AlertEvent
from monitor.store.domain import Sample
from monitor.store.vocabulary_notes import StepVocabulary

CHART_CID = "kl-chart@klmon"
MAX_SUBJECT = 180
TOP_TOKENS = 5
MAX_SAMPLES = 3
SAMPLE_CHARS = 400


@dataclass(frozen=True)
class RunLabel:
    id: int
    project: str
    name: str

    @property
    def label(self) -> str:
        return f"{self.project}/{self.name}"


@dataclass
class Rendered:
    """A notification ready for the outbox: ``email`` and ``webhook`` payloads."""

    subject: str
    text: str
    html: str
    images: dict[str, bytes] = field(default_factory=dict)
    webhook: dict[str, Any] = field(default_factory=dict)

    def email_payload(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "html": self.html,
            "images": {cid: base64.b64encode(b).decode("ascii") for cid, b in self.images.items()},
        }


def header_safe(value: str, limit: int = MAX_SUBJECT) -> str:
    """One line: CR, LF and other control characters become spaces; cut at ``limit``."""
    cleaned = "".join(" " if (ord(c) < 32 or ord(c) == 127) else c for c in value)
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def worst(events: Sequence[AlertEvent]) -> AlertEvent | None:
    """The episode to headline: highest severity, then the latest fired."""
    if not events:
        return None
    return max(
        events,
        key=lambda e: (SEVERITY_RANK.get(e.severity, 0), e.fired_step or e.start_step, e.id),
    )


def dashboard_link(base: str | None, run_id: int, step: int | None) -> str | None:
    if not base:
        return None
    return f"{base.rstrip('/')}/run/{int(run_id)}" + (
        f"?step={int(step)}" if step is not None else ""
    )


#: Detectors whose episodes peak on the KL itself.
KL_DETECTORS = frozenset(
    {"budget", "spike", "shift", "reward_hacking", "negative_kl", "reference_offset"}
)


def peak_phrase(e: AlertEvent) -> str | None:
    """'KL reached 17.8 at step 70' (None when the episode has no peak)."""
    if e.peak_value is None or e.peak_step is None:
        return None
    what = "KL" if e.detector in KL_DETECTORS else e.rule
    return f"{what} reached {e.peak_value:.3g} at step {e.peak_step}"


def subject_for(run: RunLabel, fired: Sequence[AlertEvent], resolved: Sequence[AlertEvent]) -> str:
    head = worst(fired)
    if head is not None:
        more = len(fired) - 1
        peak = peak_phrase(head) if head.escalated_step is not None else None
        if peak:  # it grew well past the value that opened it before this notice
            text = f"[klmon] {head.severity.upper()}: {peak}: {head.rule} on {run.label}"
        else:
            text = f"[klmon] {head.severity.upper()}: {head.rule} on {run.label}"
        if more:
            text += f" (+{more} more)"
        if resolved:
            text += f", {len(resolved)} resolved"
    else:
        last = worst(resolved)
        assert last is not None
        text = f"[klmon] RESOLVED: {last.rule} on {run.label}"
        if len(resolved) > 1:
            text += f" (+{len(resolved) - 1} more)"
    return header_safe(text)


def top_tokens(sample: Sample, k: int = TOP_TOKENS) -> list[tuple[str, float]]:
    """The ``k`` tokens of a sample with the largest log-ratio log p - log q."""
    p = np.asarray(sample.policy_logprobs, dtype=float)
    q = np.asarray(sample.ref_logprobs, dtype=float)
    n = min(len(p), len(q))
    if n == 0:
        return []
    ratio = p[:n] - q[:n]
    ratio = np.where(np.isfinite(ratio), ratio, -np.inf)
    order = np.argsort(-ratio, kind="stable")[:k]
    tokens = sample.tokens or []
    out = []
    for i in order:
        if not np.isfinite(ratio[i]):
            continue
        tok = str(tokens[i]) if i < len(tokens) else f"#{int(i)}"
        out.append((tok, float(ratio[i])))
    return out


def _clip(text: str | None, limit: int = SAMPLE_CHARS) -> str:
    if not text:
        return ""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more chars)"


_HTML_OPEN = (
    '<!DOCTYPE html><html><body style="font-family:Arial,Helvetica,sans-serif;'
    'font-size:14px;color:#222">'
)


def _chart_img(alt: str) -> str:
    """The inline chart attached to the email (its Content-ID is CHART_CID)."""
    return f'<p><img src="cid:{CHART_CID}" alt="{alt}" width="640" style="max-width:100%"></p>'


def _event_dict(e: AlertEvent, link: str | None) -> dict[str, Any]:
    return {
        "event_id": e.id,
        "rule": e.rule,
        "detector": e.detector,
        "severity": e.severity,
        "state": e.state,
        "start_step": e.start_step,
        "fired_step": e.fired_step,
        "end_step": e.end_step,
        "value": e.value,
        "threshold": e.threshold,
        "peak_value": e.peak_value,
        "peak_step": e.peak_step,
        "message": e.message,
        "causes": list(e.causes),
        "url": link,
    }


def warm_up() -> None:
    """Import the email chart's module (matplotlib's Agg backend) now, so the first alert
    does not pay for it."""
    import monitor.charts.png  # noqa: F401


def render(
    run: RunLabel,
    fired: Sequence[AlertEvent],
    resolved: Sequence[AlertEvent],
    *,
    steps: pd.DataFrame | None = None,
    samples: Sequence[Sample] = (),
    sample_step: int | None = None,
    dashboard_url: str | None = None,
    vocabulary: StepVocabulary | None = None,
) -> Rendered:
    """Render one notification for a run: the episodes that fired (some may have resolved
    already, in a post-mortem pass) and those that resolved after their firing was sent.
    ``vocabulary``: the tokens that carry the log-ratio at the headline step (a line in the
    text and the HTML when the run has a token ledger there)."""
    if not fired and not resolved:
        raise ValueError("render: nothing to notify")
    head = worst(fired) or worst(resolved)
    assert head is not None
    focus = head.fired_step if head in fired else head.end_step
    focus = head.start_step if focus is None else focus
    link = dashboard_link(dashboard_url, run.id, focus)
    subject = subject_for(run, fired, resolved)
    chart = _chart(steps, head, focus, f"{run.label}: {head.rule} at step {focus}")
    images = {CHART_CID: chart} if chart else {}
    vocab = _vocabulary_text(vocabulary)
    text = _text(run, fired, resolved, samples, sample_step, link, dashboard_url, vocab)
    body = _html(
        run, fired, resolved, samples, sample_step, link, dashboard_url, bool(chart), vocab
    )
    webhook = {
        "text": _slack_text(run, fired, resolved, link),
        "run": {"id": run.id, "project": run.project, "name": run.name},
        "severity": (worst(fired) or head).severity,
        "url": link,
        "vocabulary": vocab or None,
        "fired": [
            _event_dict(e, dashboard_link(dashboard_url, run.id, e.fired_step)) for e in fired
        ],
        "resolved": [
            _event_dict(e, dashboard_link(dashboard_url, run.id, e.end_step)) for e in resolved
        ],
    }
    return Rendered(subject=subject, text=text, html=body, images=images, webhook=webhook)


def _chart(
    steps: pd.DataFrame | None, head: AlertEvent, focus: int | None, title: str
) -> bytes | None:
    """The KL chart PNG around ``focus`` (the budget line for a budget rule), or None: a
    chart is a nicety, never lose the notification over it."""
    if steps is None:
        return None
    try:
        from monitor.charts.png import kl_chart_png

        return kl_chart_png(
            steps,
            focus_step=focus,
            threshold=head.threshold if head.detector == "budget" else None,
            title=header_safe(title, 90),
        )
    except Exception:
        return None


def render_escalation(
    run: RunLabel,
    events: Sequence[AlertEvent],
    *,
    steps: pd.DataFrame | None = None,
    dashboard_url: str | None = None,
    vocabulary: StepVocabulary | None = None,
) -> Rendered:
    """A notification for firing episodes whose peak grew well past what was announced:
    the subject and the first line give the peak ("KL reached 17.8 at step 70");
    ``vocabulary`` at the peak step as in :func:`render`."""
    if not events:
        raise ValueError("render_escalation: nothing to notify")
    head = max(events, key=lambda e: (SEVERITY_RANK.get(e.severity, 0), abs(e.peak_value or 0)))
    peak = peak_phrase(head) or f"{head.rule} escalated"
    link = dashboard_link(dashboard_url, run.id, head.peak_step)
    subject = header_safe(
        f"[klmon] {head.severity.upper()}: {peak}: {head.rule} on {run.label}"
        + (f" (+{len(events) - 1} more)" if len(events) > 1 else "")
    )
    chart = _chart(steps, head, head.peak_step, f"{run.label}: {peak}")
    images = {CHART_CID: chart} if chart else {}
    lines = [f"{peak} on run {run.label} (id {run.id}).", ""]
    for e in events:
        lines.append(f"ESCALATED [{e.severity}] {e.rule} ({e.detector}): {peak_phrase(e)}")
        lines.append(f"  opened with: {e.message}")
        lines.append(f"  {_value_and_steps(e)}")
        url = dashboard_link(dashboard_url, run.id, e.peak_step)
        if url:
            lines.append(f"  {url}")
        lines.append("")
    vocab = _vocabulary_text(vocabulary)
    if vocab:
        lines += [vocab, ""]
    text = "\n".join(lines) + "\n"
    e_ = html.escape
    body = [_HTML_OPEN, f'<h2 style="margin:0 0 8px">{e_(peak)} on run {e_(run.label)}</h2>']
    if chart:
        body.append(_chart_img("KL around the peak"))
    if vocab:
        body.append(f"<p>{e_(vocab)}</p>")
    for e in events:
        colour = _SEV_COLOUR.get(e.severity, "#222")
        body.append(
            f'<div style="border-left:4px solid {colour};padding:4px 10px;margin:10px 0">'
            f'<b style="color:{colour}">ESCALATED [{e_(e.severity)}]</b> <b>{e_(e.rule)}</b> '
            f"({e_(e.detector)}): {e_(peak_phrase(e) or '')}<br>"
            f'<span style="color:#555">opened with: {e_(e.message)}</span><br>'
            f"{e_(_when(e))}</div>"
        )
    if link:
        body.append(f'<p><a href="{e_(link, quote=True)}">Open the peak in the dashboard</a></p>')
    body.append('<p style="color:#888;font-size:12px">Sent by klmon alerts.</p></body></html>')
    webhook = {
        "text": f"*klmon* run `{_slack(run.label)}`: {_slack(peak)} (`{_slack(head.rule)}`)",
        "run": {"id": run.id, "project": run.project, "name": run.name},
        "severity": head.severity,
        "url": link,
        "escalated": [
            _event_dict(e, dashboard_link(dashboard_url, run.id, e.peak_step)) for e in events
        ],
    }
    return Rendered(
        subject=subject, text=text, html="\n".join(body), images=images, webhook=webhook
    )


def _vocabulary_text(v: StepVocabulary | None) -> str:
    """``Drift vocabulary at step 70: carried by '␣help' 38%, ...``, or '' without a ledger."""
    line = "" if v is None else vocabulary_line(v.top, v.changes)
    return f"Drift vocabulary at step {v.step}: {line}." if v is not None and line else ""


def _value_and_steps(e: AlertEvent) -> str:
    return f"value {number_text(e.value)}, threshold {number_text(e.threshold)}; {_when(e)}"


def _when(e: AlertEvent) -> str:
    parts = [f"pending at step {e.start_step}"]
    if e.fired_step is not None:
        parts.append(f"fired at step {e.fired_step}")
    if e.end_step is not None:
        parts.append(f"resolved at step {e.end_step}")
    return ", ".join(parts)


def _text(
    run: RunLabel,
    fired: Sequence[AlertEvent],
    resolved: Sequence[AlertEvent],
    samples: Sequence[Sample],
    sample_step: int | None,
    link: str | None,
    base: str | None,
    vocab: str = "",
) -> str:
    head = worst(fired)
    peak = peak_phrase(head) if head is not None and head.escalated_step is not None else None
    lines = [f"{peak} on run {run.label} (id {run.id})", ""] if peak else []
    lines += [f"klmon alerts for run {run.label} (id {run.id})", ""]
    for e in fired:
        tag = "FIRED (since resolved)" if e.state == "resolved" else "FIRING"
        lines.append(f"{tag} [{e.severity}] {e.rule} ({e.detector}) at step {e.fired_step}")
        lines.append(f"  {e.message}")
        lines.append(f"  {_value_and_steps(e)}")
        if peak_phrase(e):
            lines.append(f"  peak: {peak_phrase(e)}")
        if e.causes:
            lines.append("  likely causes:")
            lines.extend(f"    - {c}" for c in e.causes)
        url = dashboard_link(base, run.id, e.fired_step)
        if url:
            lines.append(f"  {url}")
        lines.append("")
    for e in resolved:
        lines.append(f"RESOLVED [{e.severity}] {e.rule} ({e.detector}) at step {e.end_step}")
        lines.append(f"  was: {e.message}")
        lines.append(f"  {_when(e)}; last value {number_text(e.last_value)}")
        if peak_phrase(e):
            lines.append(f"  peak: {peak_phrase(e)}")
        lines.append("")
    if vocab:
        lines += [vocab, ""]
    if samples:
        lines.append(f"Highest-KL samples at step {sample_step}:")
        for s in list(samples)[:MAX_SAMPLES]:
            lines.append(
                f"  sequence {s.seq_index} (rank {s.rank}): kl_seq {number_text(s.kl_seq)}, "
                f"reward {number_text(s.reward)}"
            )
            if s.prompt:
                lines.append(f"    prompt:   {_clip(s.prompt)}")
            if s.response:
                lines.append(f"    response: {_clip(s.response)}")
            toks = ", ".join(f"{token_label(tok)} {v:+.3g}" for tok, v in top_tokens(s))
            if toks:
                lines.append(f"    top-KL tokens (log p - log q): {toks}")
        lines.append("")
    if link:
        lines.append(f"Dashboard: {link}")
    else:
        lines.append("Set KLMON_DASHBOARD_URL to get a link to the dashboard here.")
    return "\n".join(lines) + "\n"


_SEV_COLOUR = {"critical": "#b00020", "warning": "#b36b00", "info": "#1f5fa8"}


def _html(
    run: RunLabel,
    fired: Sequence[AlertEvent],
    resolved: Sequence[AlertEvent],
    samples: Sequence[Sample],
    sample_step: int | None,
    link: str | None,
    base: str | None,
    has_chart: bool,
    vocab: str = "",
) -> str:
    e_ = html.escape
    out = [
        _HTML_OPEN,
        f'<h2 style="margin:0 0 8px">klmon: run {e_(run.label)} '
        f'<span style="color:#888;font-weight:normal">(id {run.id})</span></h2>',
    ]
    if has_chart:
        out.append(_chart_img("KL around the alert"))
    for e in fired:
        colour = _SEV_COLOUR.get(e.severity, "#222")
        tag = "fired (since resolved)" if e.state == "resolved" else "FIRING"
        url = dashboard_link(base, run.id, e.fired_step)
        out.append(
            f'<div style="border-left:4px solid {colour};padding:4px 10px;margin:10px 0">'
            f'<b style="color:{colour}">{e_(tag)} [{e_(e.severity)}]</b> '
            f"<b>{e_(e.rule)}</b> ({e_(e.detector)}) at step {e_(str(e.fired_step))}<br>"
            f"{e_(e.message)}<br>"
            f'<table style="font-size:13px;border-collapse:collapse">'
            f'<tr><td style="padding-right:12px">value</td><td>{e_(number_text(e.value))}</td></tr>'
            f'<tr><td style="padding-right:12px">threshold</td>'
            f"<td>{e_(number_text(e.threshold))}</td></tr>"
            f'<tr><td style="padding-right:12px">steps</td><td>{e_(_when(e))}</td></tr>'
            f'<tr><td style="padding-right:12px">peak</td>'
            f"<td>{e_(peak_phrase(e) or '-')}</td></tr>"
            "</table>"
        )
        if e.causes:
            out.append('Likely causes:<ul style="margin:4px 0">')
            out.extend(f"<li>{e_(c)}</li>" for c in e.causes)
            out.append("</ul>")
        if url:
            out.append(
                f'<a href="{e_(url, quote=True)}">Open step {e.fired_step} in the dashboard</a>'
            )
        out.append("</div>")
    for e in resolved:
        out.append(
            '<div style="border-left:4px solid #2e7d32;padding:4px 10px;margin:10px 0">'
            f'<b style="color:#2e7d32">RESOLVED [{e_(e.severity)}]</b> <b>{e_(e.rule)}</b> '
            f"({e_(e.detector)}) at step {e_(str(e.end_step))}<br>"
            f'<span style="color:#555">was: {e_(e.message)}</span><br>'
            f"{e_(_when(e))}; last value {e_(number_text(e.last_value))}"
            + (f"; peak: {e_(peak_phrase(e) or '')}" if peak_phrase(e) else "")
            + "</div>"
        )
    if vocab:
        out.append(f"<p>{e_(vocab)}</p>")
    if samples:
        out.append(f'<h3 style="margin:14px 0 4px">Highest-KL samples at step {sample_step}</h3>')
        out.append(
            '<table style="font-size:13px;border-collapse:collapse" border="1" cellpadding="4">'
            "<tr><th>seq</th><th>kl_seq</th><th>reward</th><th>prompt / response</th>"
            "<th>top-KL tokens (log p &minus; log q)</th></tr>"
        )
        for s in list(samples)[:MAX_SAMPLES]:
            toks = "<br>".join(
                f"<code>{e_(token_label(tok))}</code> {v:+.3g}" for tok, v in top_tokens(s)
            )
            text = ""
            if s.prompt:
                text += f"<b>prompt</b> {e_(_clip(s.prompt))}<br>"
            if s.response:
                text += f"<b>response</b> {e_(_clip(s.response))}"
            out.append(
                f"<tr><td>{s.seq_index}</td><td>{e_(number_text(s.kl_seq))}</td>"
                f"<td>{e_(number_text(s.reward))}</td><td>{text}</td><td>{toks}</td></tr>"
            )
        out.append("</table>")
    if link:
        out.append(
            f'<p><a href="{e_(link, quote=True)}">Open run {e_(run.label)} at this step</a></p>'
        )
    out.append('<p style="color:#888;font-size:12px">Sent by klmon alerts.</p></body></html>')
    return "\n".join(out)


def _slack(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_text(
    run: RunLabel, fired: Sequence[AlertEvent], resolved: Sequence[AlertEvent], link: str | None
) -> str:
    lines = [f"*klmon* run `{_slack(run.label)}`"]
    for e in fired:
        tag = "fired (resolved since)" if e.state == "resolved" else "FIRING"
        lines.append(
            f"• {tag} *{_slack(e.severity)}* `{_slack(e.rule)}` at step {e.fired_step}: "
            f"{_slack(e.message)}"
        )
    for e in resolved:
        lines.append(f"• resolved `{_slack(e.rule)}` at step {e.end_step}")
    if link:
        lines.append(f"<{link}|Open in the dashboard>")
    return "\n".join(lines)
