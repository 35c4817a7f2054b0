"""Detectors on the run's logging itself: silence and rejected steps."""

from __future__ import annotations

import numpy as np
import pandas as pd

from monitor.analytics.detectors._common import num
from monitor.analytics.findings import Context, Finding, as_context
from monitor.analytics.stall import STALL_FACTOR, STALL_MIN_SECONDS, stall_limit


def stalled(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    factor: float = STALL_FACTOR,
    min_seconds: float = STALL_MIN_SECONDS,
) -> list[Finding]:
    """A running run silent for more than ``factor`` x its median step interval and at
    least ``min_seconds`` (the rule in :mod:`monitor.analytics.stall`). Needs ``ctx.now``;
    a finished or crashed run never stalls.
    """
    context = as_context(ctx)
    if context.status != "running" or context.now is None or df.empty:
        return []
    wall = pd.to_numeric(df["wall_time"], errors="coerce").to_numpy(dtype=float)
    wall = wall[np.isfinite(wall)]
    last_seen = context.last_seen_at if context.last_seen_at is not None else wall.max()
    intervals = np.diff(wall[-200:])
    interval = float(np.median(intervals)) if len(intervals) else 0.0
    limit = stall_limit(interval, factor=factor, min_seconds=min_seconds)
    silent = context.now - last_seen
    if silent <= limit:
        return []
    step = int(df["step"].iloc[-1])
    return [
        Finding(
            detector="stalled",
            step=step,
            value=float(silent),
            threshold=float(limit),
            message=(
                f"No step since step {step}, {num(silent / 60)} min ago; steps usually "
                f"come every {num(interval)} s (threshold {num(limit / 60)} min)."
            ),
            causes=(
                "the trainer crashed or was killed (OOM, preemption) without marking the run",
                "a hung collective (NCCL timeout) or a stuck rollout engine",
                "the ingestion client cannot reach the database (check its spool)",
            ),
            severity="critical",
            series="wall_time",
        )
    ]


def rejected_input(df: pd.DataFrame, ctx: Context = None) -> list[Finding]:
    """Every step the ingestion rejected, with its reason."""
    if "status" not in df.columns:
        return []
    rejected = (df["status"] == "rejected").to_numpy()
    reasons = df["reject_reason"] if "reject_reason" in df.columns else None
    count = np.cumsum(rejected)
    steps = df["step"].to_numpy()
    out = []
    for i in np.flatnonzero(rejected):
        reason = reasons.iloc[i] if reasons is not None else None
        reason = reason if isinstance(reason, str) and reason else "no reason recorded"
        out.append(
            Finding(
                detector="rejected_input",
                step=int(steps[i]),
                value=float(count[i]),
                threshold=0.0,
                message=(
                    f"Step {int(steps[i])} was rejected: {reason} "
                    f"({int(count[i])} rejected so far)."
                ),
                causes=(
                    "NaN or inf log-probs (fp16 overflow, -inf on tokens outside the mask)",
                    "policy, reference and mask arrays of different shapes",
                    "an empty response mask",
                ),
                severity="warning",
                series="status",
            )
        )
    return out
