"""Tables and text shared by the pages, the report and the alerts: token cells coloured by
log-ratio, text sparklines, the run comparison table, the drift vocabulary's change table and
its one-line summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from monitor.formats import number_text, show_token, token_label

SPARK_CHARS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class TokenCell:
    """One response token: its text and log p - log q, with the background that shows it."""

    text: str
    logp: float
    logq: float
    diff: float
    color: str


def diverging_color(diff: float, scale: float = 2.0) -> str:
    """Red where the policy makes the token more likely than the reference (diff > 0), blue
    where less; white at 0, full colour at |diff| >= scale nats."""
    if not np.isfinite(diff):
        return "rgba(200,200,200,0.4)"
    a = min(abs(diff) / scale, 1.0)
    if diff >= 0:
        return f"rgba(214,39,40,{0.08 + 0.72 * a:.2f})"
    return f"rgba(31,119,180,{0.08 + 0.72 * a:.2f})"


def token_cells(
    tokens: Sequence[str] | None, logp: Sequence[float], logq: Sequence[float]
) -> list[TokenCell]:
    """The response tokens of a sample with their log-ratio colour (tokens missing: #i)."""
    n = min(len(logp), len(logq))
    toks = list(tokens) if tokens is not None else []
    out = []
    for i in range(n):
        p, q = float(logp[i]), float(logq[i])
        d = p - q
        text = show_token(str(toks[i])).text if i < len(toks) else f"#{i}"
        out.append(TokenCell(text, p, q, d, diverging_color(d)))
    return out


def top_tokens(cells: Sequence[TokenCell], n: int = 15) -> pd.DataFrame:
    """The tokens that carry the divergence: token, log p, log q, difference, largest
    difference first (the sum of the differences is the sequence's KL)."""
    df = pd.DataFrame(
        [(i, c.text, c.logp, c.logq, c.diff) for i, c in enumerate(cells)],
        columns=["position", "token", "log p", "log q", "difference"],
    )
    return (
        df.sort_values("difference", ascending=False, kind="stable").head(n).reset_index(drop=True)
    )


# --------------------------------------------------------------------------- tables


def sparkline(values: Sequence[float] | np.ndarray) -> str:
    """A text sparkline (block characters) of the finite values; '' when there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return ""
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return SPARK_CHARS[3] * len(v)
    idx = np.round((v - lo) / (hi - lo) * (len(SPARK_CHARS) - 1)).astype(int)
    return "".join(SPARK_CHARS[i] for i in idx)


def flatten_config(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested config as dotted keys -> display strings."""
    out: dict[str, str] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten_config(v, key))
            else:
                out[key] = _display(v)
    elif prefix:
        out[prefix] = _display(config)
    return out


def _display(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_display(x) for x in v)
    return str(v)


def comparison_table(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Runs as columns, fields as rows: identity, latest numbers, tags and every config key
    (dotted). ``runs``: dicts with label, project, name, status, last_step, last_kl,
    last_reward, tags, config. Adds a ``differs`` column: True where the runs disagree."""
    rows: dict[str, dict[str, str]] = {}
    order: list[str] = []

    def put(field_: str, label: str, value: str) -> None:
        if field_ not in rows:
            rows[field_] = {}
            order.append(field_)
        rows[field_][label] = value

    for r in runs:
        label = r["label"]
        put("project", label, _display(r.get("project")))
        put("name", label, _display(r.get("name")))
        put("status", label, _display(r.get("status")))
        put("last step", label, _display(r.get("last_step")))
        put("current KL", label, _display(r.get("last_kl")))
        put("current reward", label, _display(r.get("last_reward")))
        put("tags", label, _display(r.get("tags") or []))
    config_keys: list[str] = []
    for r in runs:
        for k in flatten_config(r.get("config") or {}):
            if k not in config_keys:
                config_keys.append(k)
    for k in sorted(config_keys):
        for r in runs:
            put(f"config.{k}", r["label"], flatten_config(r.get("config") or {}).get(k, "—"))
    labels = [r["label"] for r in runs]
    df = pd.DataFrame(
        [[f, *(rows[f].get(lb, "—") for lb in labels)] for f in order],
        columns=["field", *labels],
    )
    identity = {"project", "name", "status", "last step", "current KL", "current reward"}
    df["differs"] = (
        [
            f not in identity and len(set(vals)) > 1
            for f, vals in zip(df["field"], df[labels].itertuples(index=False), strict=True)
        ]
        if labels
        else []
    )
    return df


# --------------------------------------------------------------------------- drift vocabulary


def token_change_rows(changes: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of a "what changed" table (``monitor.store.vocabulary.CHANGE_COLUMNS``) as
    people read them: ``token`` made visible (``monitor.formats.show_token``, still to be
    escaped for the medium), ``special``, and the per-1k figures and growth as text."""
    out = []
    for r in changes.to_dict(orient="records"):
        shown = show_token(r.get("token"), r.get("token_id"))
        out.append(
            {
                "token_id": int(r["token_id"]),
                "token": shown.text,
                "special": shown.special,
                "per_1k_before": _per_1k(r["per_1k_before"]),
                "per_1k_after": _per_1k(r["per_1k_after"]),
                "lr_per_1k_before": _per_1k(r["lr_per_1k_before"]),
                "lr_per_1k_after": _per_1k(r["lr_per_1k_after"]),
                "growth": _per_1k(r["growth"]),
            }
        )
    return out


#: The headers of :func:`token_change_rows`' columns, in table order.
CHANGE_HEADERS = (
    ("token", "token"),
    ("per_1k_before", "per 1k tokens before"),
    ("per_1k_after", "per 1k tokens after"),
    ("lr_per_1k_before", "log-ratio per 1k before"),
    ("lr_per_1k_after", "log-ratio per 1k after"),
    ("growth", "growth"),
)


def vocabulary_line(top: pd.DataFrame, changes: pd.DataFrame | None = None, n: int = 3) -> str:
    """One sentence on a step's drift vocabulary, for alerts and reports: "carried by
    '␣help' 38%, '!!' 12%" from ``top`` (``read_token_ledger``: token, token_id,
    share_pos), and "since warm-up: '␣help' 0.5 -> 310 per 1k tokens" from ``changes``
    (``token_changes``). Empty when the run has no ledger there."""
    if top is None or top.empty:
        return ""
    parts = [
        f"{token_label(r['token'], r['token_id'])} {r['share_pos']:.0%}"
        for r in top.head(n).to_dict(orient="records")
        if np.isfinite(r["share_pos"])
    ]
    line = "carried by " + ", ".join(parts) if parts else ""
    grown = [
        f"{token_label(r['token'], r['token_id'])} {_per_1k(r['per_1k_before'])} -> "
        f"{_per_1k(r['per_1k_after'])} per 1k tokens"
        for r in ([] if changes is None else changes.to_dict(orient="records"))
        if r["lr_per_1k_after"] > 0  # tokens that now carry log-ratio, not ones that faded
    ][:n]
    if grown:
        line += ("; " if line else "") + "since warm-up: " + ", ".join(grown)
    return line


def _per_1k(value: float) -> str:
    """A rate per 1k tokens: whole from 10 on (730, 1,204), else two significant digits."""
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 10 else number_text(value, 2)
