"""When a running run counts as stalled: one rule for the dashboard's status and the alert.

A run is stalled when nothing was heard from it for longer than ``factor`` times its median
step interval and at least ``min_seconds``. The floor is 300 s because a routine pause (a
checkpoint save or an evaluation pass of a large model) often lasts a few minutes; a shorter
floor would show healthy runs as stalled. The dashboard and the packaged ``run-stalled``
alert use the same defaults, so the badge and the alert agree.
"""

from __future__ import annotations

#: A run is stalled after this many times its median step interval without a step ...
STALL_FACTOR = 10.0
#: ... and never before this many seconds.
STALL_MIN_SECONDS = 300.0


def stall_limit(
    median_interval: float | None,
    *,
    factor: float = STALL_FACTOR,
    min_seconds: float = STALL_MIN_SECONDS,
) -> float:
    """Seconds of silence after which a running run counts as stalled."""
    return max(min_seconds, factor * (median_interval or 0.0))


def is_stalled(
    silent_seconds: float,
    median_interval: float | None,
    *,
    factor: float = STALL_FACTOR,
    min_seconds: float = STALL_MIN_SECONDS,
) -> bool:
    """Whether ``silent_seconds`` without a step is past :func:`stall_limit`."""
    return silent_seconds > stall_limit(median_interval, factor=factor, min_seconds=min_seconds)
