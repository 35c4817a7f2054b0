"""Helpers shared by the detector modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from monitor.analytics.findings import Context, Finding, as_context
from monitor.analytics.series import (
    TOKEN_MEAN_COLUMNS,
    first_column,
    nanmedian_rows,
    pick_kl,
    robust_center_scale,
    trailing,
    valid,
)


def num(x: float) -> str:
    """A number as a person reads it: three significant digits."""
    return f"{x:.3g}"


def findings_where(
    mask: np.ndarray,
    steps: np.ndarray,
    values: np.ndarray,
    thresholds: np.ndarray | float,
    message: Callable[[int], str],
    *,
    detector: str,
    causes: tuple[str, ...],
    severity: str,
    series: str | None,
    levels: np.ndarray | None = None,
    unit: str | None = None,
) -> list[Finding]:
    """One Finding per row where ``mask`` holds; ``message(i)`` writes row i's sentence.

    ``levels`` (the observed quantity per row, in ``unit``) becomes each finding's
    ``level``: what an alert episode tracks its peak on.
    """
    limits = np.broadcast_to(np.asarray(thresholds, dtype=float), np.shape(values))
    return [
        Finding(
            detector=detector,
            step=int(steps[i]),
            value=float(values[i]),
            threshold=float(limits[i]),
            message=message(int(i)),
            causes=causes,
            severity=severity,
            series=series,
            level=None if levels is None else _finite_or_none(levels[i]),
            unit=unit,
        )
        for i in np.flatnonzero(mask)
    ]


def latch(fire: np.ndarray, hold: np.ndarray) -> np.ndarray:
    """Hysteresis: True from each row where ``fire`` holds, through the rows after it where
    ``hold`` (a looser condition: the clear threshold not yet crossed) still holds.

    Causal, and one pass: a condition hovering at its fire threshold stays one episode.
    """
    state = np.where(fire, 1.0, np.where(hold, np.nan, 0.0))
    return pd.Series(state).ffill().fillna(0.0).to_numpy() > 0


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def kl_unit(series: str) -> str:
    """The unit of a KL column: per-token estimators are nats/token, the rest nats/sequence."""
    return "nats/token" if series in TOKEN_MEAN_COLUMNS else "nats/sequence"


def kl_floor(ctx: Context, series: str, per_token: float, per_sequence: float) -> float:
    """The smallest KL change worth an alert on ``series``, in the series' own unit.

    The run's config wins (``kl_floor_per_token`` / ``kl_floor_per_sequence``: the run
    knows its scale), then the rule's parameter (``per_token`` / ``per_sequence``).
    """
    token = series in TOKEN_MEAN_COLUMNS
    key = "kl_floor_per_token" if token else "kl_floor_per_sequence"
    configured = as_context(ctx).config_float(key)
    floor = configured if configured is not None else (per_token if token else per_sequence)
    return max(0.0, float(floor))


def print_quantum(values: np.ndarray, max_decimals: int = 6) -> np.ndarray:
    """Per row, the step of the decimal grid every value so far lies on (0: none found).

    A log that prints KL to 3 decimals holds multiples of 0.001 only: many equal values,
    a median and MAD of exactly 0, so a robust scale must not fall below that step.
    Causal: row i looks at rows up to i (the grid only gets finer as rows come).
    """
    x = np.abs(np.asarray(values, dtype=float))
    # A value lies on grid 10^-d when x * 10^d is within 0.01 of a whole number below 1e5
    # (at most five significant digits: float32 storage keeps those exact to 0.01).
    decimals = np.full(len(x), max_decimals + 1)
    for d in range(max_decimals, -1, -1):
        scaled = x * 10.0**d
        on_grid = (np.abs(scaled - np.round(scaled)) <= 0.01) & (scaled >= 0.5) & (scaled < 1e5)
        decimals = np.where(on_grid, d, decimals)
    # zeros (and NaN) lie on every grid: they say nothing about the step
    decimals = np.where(np.isfinite(x) & (x > 0), decimals, -1)
    finest = np.maximum.accumulate(decimals) if len(x) else decimals
    quantum = np.where(finest > max_decimals, 0.0, 10.0 ** -np.maximum(finest, 0).astype(float))
    return np.where(finest < 0, 0.0, quantum)


def per_token_kl(df: pd.DataFrame, steps: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Per-token KL at ``steps`` (NaN where unknown) and where it came from.

    ``k3`` is the low-variance estimator; else ``k1``; else ``kl_mean / resp_len_mean``.
    """
    name = first_column(df, ("k3", "k1"))
    if name is not None:
        return column_on(df, name, steps), name
    if first_column(df, ("kl_mean",)) and first_column(df, ("resp_len_mean",)):
        kl, length = column_on(df, "kl_mean", steps), column_on(df, "resp_len_mean", steps)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(length > 0, kl / length, np.nan), "kl_mean / resp_len_mean"
    return np.full(len(steps), np.nan), None


def column_on(df: pd.DataFrame, column: str | None, steps: np.ndarray) -> np.ndarray:
    """Values of ``column`` at ``steps`` (NaN where absent)."""
    if column is None or column not in df.columns:
        return np.full(len(steps), np.nan)
    s, v = valid(df, column)
    series = pd.Series(v, index=s)
    series = series[~series.index.duplicated(keep="last")]
    return series.reindex(steps).to_numpy(dtype=float)


def statistical_series(df: pd.DataFrame) -> list[str]:
    """The KL series a noise-sensitive detector judges: ``kl_mean`` and ``k3`` if present.

    The sampled per-sequence KL's relative noise grows as KL shrinks (its spread goes
    like sqrt(KL), its mean like KL), so at GRPO-like KL it hides what the low-variance
    ``k3`` shows; judging both keeps kl_mean first while staying sensitive at any scale.
    ``k1`` only when neither exists.
    """
    found = [c for c in ("kl_mean", "k3") if first_column(df, (c,))]
    return found or [c for c in (pick_kl(df),) if c]


def merge_by_step(per_series: Iterable[list[Finding]]) -> list[Finding]:
    """One finding per step: the first series' (in the order given) that fired there."""
    by_step: dict[int, Finding] = {}
    for findings in per_series:
        for finding in findings:
            by_step.setdefault(finding.step, finding)
    return [by_step[step] for step in sorted(by_step)]


def robust_z(
    values: np.ndarray,
    rows: int,
    min_rows: int,
    mad_floor: float,
    sem: np.ndarray | None = None,
    abs_floor: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust z-score of each value against the ``rows`` values before it.

    Scale: the largest of 1.4826 MAD, ``mad_floor`` x |median| (so a flat series does
    not explode), ``abs_floor`` (in the values' unit: a caller that fires at score z
    passes its absolute floor / z, so a move smaller than the floor never scores z),
    the step of the decimal grid the values are printed on (``print_quantum``) and,
    when given, the row's own standard error ``sem`` and its median over the window:
    early in a run the KL, and its sampling noise, grow faster than a trailing MAD can
    follow, and a step whose mean moved by less than its own sampling error is no
    spike. NaN until ``min_rows`` values precede. Returns the score, the window median
    and the window count.
    """
    center, scale, count = robust_center_scale(trailing(values, rows))
    scale = np.fmax(scale, mad_floor * np.abs(center))
    scale = np.fmax(scale, np.fmax(abs_floor, print_quantum(values)))
    if sem is not None:
        scale = np.fmax(scale, np.fmax(sem, nanmedian_rows(trailing(sem, rows))))
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where((scale > 0) & (count >= min_rows), (values - center) / scale, np.nan)
    return score, center, count


def step_sem(df: pd.DataFrame, column: str, steps: np.ndarray) -> np.ndarray | None:
    """Each step's standard error of ``kl_mean`` or ``reward_mean`` from its spread, or None."""
    spread = {"kl_mean": "kl_std", "reward_mean": "reward_std"}.get(column)
    if spread is None or spread not in df.columns or "n_sequences" not in df.columns:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return column_on(df, spread, steps) / np.sqrt(column_on(df, "n_sequences", steps))
