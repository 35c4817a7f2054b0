"""What a detector returns, and the run context it judges against."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Finding:
    """One step at which a detector's condition holds.

    ``value`` is the statistic the detector judged (a KL level, a z-score, a ratio) and
    ``threshold`` what it was compared with, both in the unit the ``message`` states.
    ``causes`` are the likely causes an engineer should check first, most likely first.
    ``level`` is the observed quantity itself at that step (the KL, not its z-score), in
    ``unit``, when the detector judges one: an alert episode tracks its peak on it.
    """

    detector: str
    step: int
    value: float
    threshold: float
    message: str
    causes: tuple[str, ...] = ()
    severity: str | None = None
    series: str | None = None
    level: float | None = None
    unit: str | None = None


@dataclass(frozen=True)
class RunContext:
    """What a detector may know about a run besides its step table.

    ``now`` is injected by the caller (detectors never read the clock), in Unix seconds
    like ``last_seen_at``.
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    status: str = "running"
    last_seen_at: float | None = None
    now: float | None = None

    def config_float(self, *keys: str) -> float | None:
        """The first of ``keys`` in the config holding a finite number, else None."""
        for key in keys:
            value = self.config.get(key)
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if is_number and math.isfinite(value):
                return float(value)
        return None


#: What detectors accept as ``ctx`` (a run-like object with those attributes works too).
Context = RunContext | Mapping[str, Any] | None


def as_context(ctx: Context | Any) -> RunContext:
    """Accept a RunContext, a mapping with its field names, a run-like object, or None."""
    if isinstance(ctx, RunContext):
        return ctx
    if ctx is None:
        return RunContext()
    if isinstance(ctx, Mapping):
        get = ctx.get
    else:

        def get(name: str, default: Any = None) -> Any:
            return getattr(ctx, name, default)

    return RunContext(
        config=get("config") or {},
        status=get("status") or "running",
        last_seen_at=get("last_seen_at"),
        now=get("now"),
    )
