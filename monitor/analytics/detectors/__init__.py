"""The detector registry: pure functions ``(df, ctx, **params) -> list[Finding]``.

A rule engine calls ``DETECTORS[name](df, ctx, **params)``; ``DEFAULT_PARAMS[name]``
holds every parameter's default (read from the signatures, so it cannot drift).

Contract every detector keeps, so an engine can re-run it as steps land:
- one Finding for EVERY step at which its condition holds, not only at onset;
- causal: a step's findings depend only on rows up to that step, so cutting the table
  at step s leaves the findings for steps <= s unchanged;
- windows count rows that hold the series (real logs may have one row per 5-10 steps);
- thresholds are relative to the run itself, so one parameter set serves KL at 0.001
  (GRPO per-token) and at 30 nats (PPO per-sequence).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from monitor.analytics.detectors.behaviour import (
    entropy_collapse,
    length_drift,
    reward_hacking,
    rollout_gap,
)
from monitor.analytics.detectors.kl import (
    budget,
    concentration,
    negative_kl,
    reference_offset,
    shift,
    spike,
)
from monitor.analytics.detectors.run_state import rejected_input, stalled

__all__ = ["DEFAULT_PARAMS", "DETECTORS", "lookback_rows"]

DETECTORS: dict[str, Callable[..., list[Any]]] = {
    "budget": budget,
    "spike": spike,
    "shift": shift,
    "negative_kl": negative_kl,
    "entropy_collapse": entropy_collapse,
    "reward_hacking": reward_hacking,
    "length_drift": length_drift,
    "concentration": concentration,
    "rollout_gap": rollout_gap,
    "reference_offset": reference_offset,
    "stalled": stalled,
    "rejected_input": rejected_input,
}

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    name: {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    for name, fn in DETECTORS.items()
}

#: Detectors whose baseline is the run's first rows: they need the table from the start.
_FROM_START = frozenset(
    {
        "entropy_collapse",
        "length_drift",
        "concentration",
        "rollout_gap",
        "reference_offset",
        "reward_hacking",
    }
)


def lookback_rows(name: str, **params: Any) -> int | None:
    """Rows before a new step that ``name`` needs to judge it exactly as on the full table.

    An engine may pass a tail of this many rows (plus the new ones) instead of the table.
    None: the detector's baseline is the run's first rows (its warm-up, up to its largest
    ``*_rows`` parameter), so it needs those as well as a tail; only the whole table
    reproduces its findings exactly.
    """
    p = {**DEFAULT_PARAMS[name], **params}
    if name in _FROM_START:
        return None
    if name == "budget":
        # The EWMA's weight on older rows falls below 1e-6 after 20 half-lives.
        return int(20 * p["halflife_rows"]) + 1
    if name == "spike":
        return p["window_rows"]
    if name == "shift":
        return p["ref_rows"] + p["test_rows"]
    if name == "negative_kl":
        return p["window_rows"]
    return 1
