"""Helpers shared by the detector modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from monitor.analytics.findings import Finding
from monitor.analytics.series import (
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
) -> list[Finding]:
    """One Finding per row where ``mask`` holds; ``message(i)`` writes row i's sentence."""
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
        )
        for i in np.flatnonzero(mask)
    ]


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust z-score of each value against the ``rows`` values before it.

    Scale: the largest of 1.4826 MAD, ``mad_floor`` x |median| (so a flat series does
    not explode) and, when given, the row's own standard error ``sem`` and its median
    over the window: early in a run the KL, and its sampling noise, grow faster than a
    trailing MAD can follow, and a step whose mean moved by less than its own sampling
    error is no spike. NaN until ``min_rows`` values precede. Returns the score, the
    window median and the window count.
    """
    center, scale, count = robust_center_scale(trailing(values, rows))
    scale = np.fmax(scale, mad_floor * np.abs(center))
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
