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

import numpy as np
import pandas as pd

from monitor.analytics.detectors.behaviour import (
    CLIPPED_SUFFIX,
    LENGTH_COLUMNS,
    entropy_collapse,
    length_drift,
    reward_hacking,
    rollout_gap,
    vocabulary_concentration,
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
from monitor.analytics.series import KL_PREFERENCE

__all__ = ["DEFAULT_PARAMS", "DETECTORS", "INPUTS", "has_inputs", "lookback_rows"]

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
    "vocabulary_concentration": vocabulary_concentration,
}

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    name: {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    for name, fn in DETECTORS.items()
}

#: What each detector reads, as groups of columns: a row carries a detector's inputs when
#: it has a finite value in at least one column of every group ("*name" matches a column
#: ending in name). Detectors not listed judge every row (the clock, rejected rows).
INPUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "budget": (KL_PREFERENCE,),
    "spike": (KL_PREFERENCE,),
    "shift": (KL_PREFERENCE,),
    "reference_offset": (KL_PREFERENCE,),
    "negative_kl": (("kl_mean", "k1", "neg_kl_frac"),),
    "entropy_collapse": (("policy_nll", "entropy_mean"),),
    "reward_hacking": (("reward_mean",), KL_PREFERENCE),
    "length_drift": ((*LENGTH_COLUMNS, "*" + CLIPPED_SUFFIX),),
    "concentration": (("top1pct_share",),),
    "rollout_gap": (("rollout_gap",),),
    "vocabulary_concentration": (("vocab_top_share",),),
}


def has_inputs(name: str, df: pd.DataFrame) -> np.ndarray:
    """Per row of ``df``, whether it carries the inputs of detector ``name`` (see INPUTS).

    A row without them (a TRL row that logs the loss but not the generation metrics)
    says nothing about the detector's condition: an alert engine neither confirms nor
    clears a rule on it, and counts only rows that carry the inputs.
    """
    mask = np.ones(len(df), dtype=bool)
    for group in INPUTS.get(name, ()):
        columns = [
            c
            for c in df.columns
            if any(str(c).endswith(g[1:]) if g.startswith("*") else str(c) == g for g in group)
        ]
        present = np.zeros(len(df), dtype=bool)
        for c in columns:
            values = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            present |= np.isfinite(values)
        mask &= present
    return mask


#: Detectors whose baseline is the run's first rows: they need the table from the start.
_FROM_START = frozenset(
    {
        "entropy_collapse",
        "length_drift",
        "concentration",
        "rollout_gap",
        "reference_offset",
        "reward_hacking",
        "vocabulary_concentration",
    }
)


def lookback_rows(name: str, **params: Any) -> int | None:
    """Rows before a new step that ``name`` needs to judge it exactly as on the full table.

    An engine may pass a tail of this many rows (plus the new ones) instead of the table.
    None: the detector's baseline is the run's first rows (its warm-up, up to its largest
    ``*_rows`` parameter), so it needs those as well as a tail; only the whole table
    reproduces its findings exactly. Hysteresis (budget, entropy_collapse) is judged
    from the rows given: a level that has hovered between its clear and fire thresholds
    for longer than the tail is judged afresh at the tail's start.
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
