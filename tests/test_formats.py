"""The small rules every layer shares: JSON-safe values, numbers and times for people, and
when a run counts as stalled (the dashboard's status and the alert must agree)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from monitor.analytics import DETECTORS, RunContext
from monitor.analytics.stall import STALL_MIN_SECONDS, is_stalled, stall_limit
from monitor.dashboard.data import derive_status
from monitor.formats import (
    UTC_COMPACT,
    UTC_MINUTES,
    TokenShown,
    json_safe,
    number_text,
    show_token,
    token_label,
    utc_text,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.float32(0.5), 0.5),
        (np.int64(7), 7),
        (np.bool_(True), True),
        (math.nan, None),
        (np.float64(np.inf), None),
        (-math.inf, None),
        (pd.NA, None),
        (pd.NaT, None),
        (None, None),
        ("text", "text"),
        (3, 3),
    ],
)
def test_json_safe_gives_plain_values_and_none_for_missing(value, expected):
    out = json_safe(value)
    assert out == expected and type(out) is type(expected)
    json.dumps(out, allow_nan=False)


def test_json_safe_leaves_containers_alone():
    cell = [1, 2]
    assert json_safe(cell) is cell


def test_number_text():
    assert number_text(None) == "-"
    assert number_text(math.nan) == "-"
    assert number_text(np.float32(0.123456)) == "0.1235"
    assert number_text(12345.0) == "1.234e+04"
    assert number_text(12345.0, whole=True) == "12345"
    assert number_text(2.5, whole=True) == "2.5"
    assert number_text("n/a") == "n/a"


def test_utc_text_patterns_and_missing_values():
    ts = 1714566896.0  # 2024-05-01 12:34:56 UTC
    assert utc_text(ts) == "2024-05-01 12:34:56 UTC"
    assert utc_text(ts, UTC_MINUTES) == "2024-05-01 12:34 UTC"
    assert utc_text(ts, UTC_COMPACT) == "2024-05-01 12:34:56Z"
    assert utc_text(None) == utc_text(math.nan) == utc_text("soon") == "-"
    assert utc_text(None, missing="") == ""
    assert utc_text(1e20) == "Unix time 100000000000000000000"


def test_stall_limit_is_the_larger_of_the_floor_and_ten_intervals():
    assert stall_limit(None) == STALL_MIN_SECONDS
    assert stall_limit(1.0) == STALL_MIN_SECONDS
    assert stall_limit(60.0) == 600.0
    assert not is_stalled(STALL_MIN_SECONDS, 1.0)
    assert is_stalled(STALL_MIN_SECONDS + 1, 1.0)


@pytest.mark.parametrize("silent", [60.0, 299.0, 301.0, 900.0])
def test_dashboard_status_and_stalled_alert_agree(silent):
    now = 1_000_000.0
    walls = now - silent - np.arange(50, dtype=float)[::-1] * 2.0  # a step every 2 s
    df = pd.DataFrame({"step": np.arange(50), "wall_time": walls})
    ctx = RunContext(status="running", last_seen_at=float(walls[-1]), now=now)
    alert = bool(DETECTORS["stalled"](df, ctx))
    status = derive_status("running", float(walls[-1]), float(walls[-1]), 2.0, now)
    assert alert == (status == "stalled") == (silent > STALL_MIN_SECONDS)


@pytest.mark.parametrize(
    ("text", "shown", "special"),
    [
        (" help", "␣help", False),
        ("Ġhelp", "␣help", False),  # GPT-2's space marker
        ("▁help", "␣help", False),  # SentencePiece's
        ("\n", "↵", False),
        ("a\tb", "a\\tb", False),
        ("\r\x1b[31m", "\\r\\x1b[31m", False),
        ("\u200b", "\\u200b", False),  # zero-width space
        ("", "∅", False),
        ("<|eos|>", "<|eos|>", True),
        ("</s>", "</s>", True),
        ("[CLS]", "[CLS]", True),
        ("<b>", "<b>", True),  # looks like a special token: marked, still shown as text
        ("<img src=x>", "<img␣src=x>", False),
        ("!!", "!!", False),
    ],
)
def test_show_token_makes_whitespace_and_specials_visible(text, shown, special) -> None:
    assert show_token(text) == TokenShown(shown, special)


def test_token_without_text_shows_its_id_and_labels_quote_or_mark() -> None:
    assert show_token(None, 42).text == "#42"
    assert token_label(" help") == "'␣help'"
    assert token_label("<|eos|>") == "<|eos|> (special)"
