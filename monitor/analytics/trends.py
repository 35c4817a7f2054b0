"""Trends of a run's KL: smoothing, slope, when it will cross its budget, reward per sqrt(KL).

Reward-model over-optimisation grows with sqrt(KL) (Gao et al., 2022), so a healthy run
gains reward roughly in proportion to sqrt(KL); the gain per unit of sqrt(KL) collapsing
while KL keeps growing is the signature of reward hacking.
Everything here is causal: the value at a row depends only on that row and earlier ones.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from monitor.analytics.findings import Context, RunContext, as_context
from monitor.analytics.series import TOKEN_MEAN_COLUMNS, aligned, including, pick_kl

__all__ = [
    "compute_trends",
    "expanding_slope",
    "forecast_crossing",
    "halflife_ewma",
    "resolve_budget",
    "reward_sqrt_kl_slope",
    "rolling_slope",
]


def halflife_ewma(values: np.ndarray, halflife_rows: float = 10.0) -> np.ndarray:
    """Exponentially weighted mean over rows with a half-life of ``halflife_rows`` (NaNs
    skipped, never looking ahead); what the detectors and trends smooth with."""
    series = pd.Series(np.asarray(values, dtype=float))
    return series.ewm(halflife=halflife_rows, ignore_na=True).mean().to_numpy()


def rolling_slope(steps: np.ndarray, values: np.ndarray, rows: int = 20) -> np.ndarray:
    """Least-squares slope of ``values`` on ``steps`` (any x) over the last ``rows`` rows
    (NaN until 3 rows exist)."""
    x = including(np.asarray(steps, dtype=float), rows)
    y = including(values, rows)
    ok = np.isfinite(x) & np.isfinite(y)
    x = np.where(ok, x, np.nan)
    y = np.where(ok, y, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dx = x - np.nanmean(x, axis=1, keepdims=True)
        dy = y - np.nanmean(y, axis=1, keepdims=True)
        slope = np.nansum(dx * dy, axis=1) / np.nansum(dx * dx, axis=1)
    slope[ok.sum(axis=1) < 3] = np.nan
    return slope


def forecast_crossing(step: float, level: float, slope: float, budget: float) -> float | None:
    """Step at which ``level`` reaches ``budget`` at ``slope`` per step; None when not rising.

    A level already at or above the budget crosses at ``step`` itself.
    """
    if not all(np.isfinite(v) for v in (step, level, budget)):
        return None
    if level >= budget:
        return float(step)
    if not np.isfinite(slope) or slope <= 0:
        return None
    return float(step + (budget - level) / slope)


def resolve_budget(
    ctx: RunContext,
    value: float | None = None,
    factor: float = 1.5,
    *,
    series: str = "kl_mean",
    length: float | None = None,
    default: float | None = None,
) -> tuple[float | None, str]:
    """The run's KL budget for ``series``, in that series' unit, and where it came from.

    Per sequence (``kl_mean``): an explicit ``value`` wins, then the config's
    ``kl_budget``, then ``factor`` times its ``target_kl`` (an adaptive KL controller
    hovers around its target, so the budget sits above it), then ``default``.
    Per token (``k1``/``k2``/``k3``): ``value``, then ``kl_budget_per_token``, then
    ``factor`` x ``target_kl_per_token``, then the per-sequence budget divided by the
    mean response ``length`` when it is known, then ``default``.
    """
    if value is not None:
        return float(value), "rule value"
    if series in TOKEN_MEAN_COLUMNS:
        budget = ctx.config_float("kl_budget_per_token")
        if budget is not None:
            return budget, "config kl_budget_per_token"
        target = ctx.config_float("target_kl_per_token")
        if target is not None:
            return factor * target, f"{factor:g} x config target_kl_per_token {target:g}"
        per_sequence, source = resolve_budget(ctx, None, factor)
        if per_sequence is not None and length is not None and length > 0:
            return per_sequence / length, f"{source} / mean response length {length:.3g}"
    else:
        budget = ctx.config_float("kl_budget")
        if budget is not None:
            return budget, "config kl_budget"
        target = ctx.config_float("target_kl", "kl_target")
        if target is not None:
            return factor * target, f"{factor:g} x config target_kl {target:g}"
    if default is not None:
        return float(default), "default"
    return None, "no budget"


def reward_sqrt_kl_slope(sqrt_kl: np.ndarray, reward: np.ndarray, rows: int = 20) -> np.ndarray:
    """Reward gained per unit of sqrt(KL) locally: regression slope over the last ``rows`` rows."""
    return rolling_slope(sqrt_kl, reward, rows)


def expanding_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y on x over all rows so far (rows with a NaN skipped)."""
    ok = np.isfinite(x) & np.isfinite(y)
    xs, ys = np.where(ok, x, 0.0), np.where(ok, y, 0.0)
    n = np.cumsum(ok)
    sx, sy = np.cumsum(xs), np.cumsum(ys)
    sxx, sxy = np.cumsum(xs * xs), np.cumsum(xs * ys)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = sxx - sx * sx / n
        slope = (sxy - sx * sy / n) / var
    # Nearly constant x so far (all KL ~0): no slope to speak of.
    return np.where((n >= 3) & (var > 1e-12 * np.maximum(sxx, 1e-300)), slope, np.nan)


def compute_trends(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    halflife_rows: float = 10.0,
    slope_rows: int = 20,
    budget: float | None = None,
    budget_factor: float = 1.5,
) -> pd.DataFrame:
    """Per-row trends of the run's KL series (see ``pick_kl``), one row per step that has it.

    Columns: ``step``, ``kl`` (the raw series, named in ``attrs['series']``), ``kl_ewma``
    (smoothed over ``halflife_rows`` rows), ``kl_slope`` (per step, of the smoothed KL over
    ``slope_rows`` rows), ``budget`` (see ``resolve_budget``), ``budget_cross_step`` (the
    step at which the smoothed KL reaches the budget at the current slope; NaN when not
    rising or no budget), ``sqrt_kl`` (smoothed sqrt(KL)), ``reward`` and
    ``reward_ewma``, ``reward_per_sqrt_kl`` (reward gained per unit of sqrt(KL) over the
    run so far: the regression slope of smoothed reward on sqrt_kl, which a healthy run
    keeps roughly constant) and ``reward_sqrt_kl_slope`` (the same over the last
    ``slope_rows`` rows: it collapses when KL grows faster than reward justifies).
    """
    context = as_context(ctx)
    series = pick_kl(df)
    columns = [
        "step", "kl", "kl_ewma", "kl_slope", "budget", "budget_cross_step", "sqrt_kl",
        "reward", "reward_ewma", "reward_per_sqrt_kl", "reward_sqrt_kl_slope",
    ]  # fmt: skip
    if series is None:
        out = pd.DataFrame(columns=columns)
        out.attrs["series"] = None
        return out
    steps, kl = aligned(df, [series])
    kl = kl[:, 0]
    smooth = halflife_ewma(kl, halflife_rows)
    slope = rolling_slope(steps, smooth, slope_rows)
    limit, _ = resolve_budget(context, budget, budget_factor, series=series)
    cross = np.array(
        [
            np.nan if (c := forecast_crossing(s, k, d, limit or np.nan)) is None else c
            for s, k, d in zip(steps, smooth, slope, strict=True)
        ]
    )
    # Smoothing sqrt(KL) and reward alike keeps a linear relation between them linear.
    sqrt_kl = halflife_ewma(np.sqrt(np.clip(kl, 0.0, None)), halflife_rows)
    reward = _reward_on(df, steps)
    reward_smooth = halflife_ewma(reward, halflife_rows)
    out = pd.DataFrame(
        {
            "step": steps,
            "kl": kl,
            "kl_ewma": smooth,
            "kl_slope": slope,
            "budget": np.nan if limit is None else limit,
            "budget_cross_step": cross,
            "sqrt_kl": sqrt_kl,
            "reward": reward,
            "reward_ewma": reward_smooth,
            "reward_per_sqrt_kl": expanding_slope(sqrt_kl, reward_smooth),
            "reward_sqrt_kl_slope": reward_sqrt_kl_slope(sqrt_kl, reward_smooth, slope_rows),
        }
    )
    out.attrs["series"] = series
    return out


def _reward_on(df: pd.DataFrame, steps: np.ndarray) -> np.ndarray:
    """reward_mean at ``steps`` (NaN where absent)."""
    if "reward_mean" not in df.columns:
        return np.full(len(steps), np.nan)
    reward = pd.to_numeric(df["reward_mean"], errors="coerce").to_numpy(dtype=float)
    by_step = pd.Series(reward, index=df["step"].to_numpy())
    by_step = by_step[~by_step.index.duplicated(keep="last")]
    return by_step.reindex(steps).to_numpy(dtype=float)
