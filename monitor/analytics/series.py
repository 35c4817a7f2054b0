"""Picking series out of a step table and robust statistics over trailing row windows.

Windows are counted in rows holding a finite value of the series (rejected and partial
rows drop out), because real logs are sparse: one row every 5 or 10 steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

#: KL columns in the order detectors prefer them: the per-sequence mean if the run has it,
#: else a per-token estimator (GRPO imports carry only ``k3``).
KL_PREFERENCE: tuple[str, ...] = ("kl_mean", "k3", "k1")
#: Columns measured per token (the rest of the KL family is a per-sequence sum).
TOKEN_MEAN_COLUMNS = frozenset({"k1", "k2", "k3"})
#: MAD times this estimates a normal standard deviation.
MAD_TO_SIGMA = 1.4826


def first_column(df: pd.DataFrame, candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` that the table has with at least one finite value."""
    for name in candidates:
        if name in df.columns and np.isfinite(_floats(df[name])).any():
            return name
    return None


def pick_kl(df: pd.DataFrame, prefer: Sequence[str] = KL_PREFERENCE) -> str | None:
    """The KL series a detector should read (see ``KL_PREFERENCE``), or None."""
    return first_column(df, prefer)


def valid(df: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of the rows where ``column`` is finite, in table order."""
    values = _floats(df[column])
    keep = np.isfinite(values)
    return df["step"].to_numpy()[keep].astype(np.int64), values[keep]


def aligned(df: pd.DataFrame, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Steps and an (n, k) array of the rows where every one of ``columns`` is finite."""
    values = np.column_stack([_floats(df[c]) for c in columns])
    keep = np.isfinite(values).all(axis=1)
    return df["step"].to_numpy()[keep].astype(np.int64), values[keep]


def trailing(x: np.ndarray, rows: int) -> np.ndarray:
    """(n, rows) windows: row i holds the ``rows`` values before x[i], NaN-padded at the start."""
    padded = np.concatenate([np.full(rows, np.nan), np.asarray(x, dtype=float)])
    return np.lib.stride_tricks.sliding_window_view(padded, rows)[: len(x)]


def including(x: np.ndarray, rows: int) -> np.ndarray:
    """(n, rows) windows ending at and including x[i], NaN-padded at the start."""
    padded = np.concatenate([np.full(rows - 1, np.nan), np.asarray(x, dtype=float)])
    return np.lib.stride_tricks.sliding_window_view(padded, rows)


def robust_center_scale(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window: median, MAD scaled to a standard deviation, and the count of values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        center = np.nanmedian(windows, axis=1)
        scale = MAD_TO_SIGMA * np.nanmedian(np.abs(windows - center[:, None]), axis=1)
    return center, scale, np.isfinite(windows).sum(axis=1)


def nanmedian_rows(windows: np.ndarray) -> np.ndarray:
    """Median of each window, NaN where a window is empty."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(windows, axis=1)


def nanmean_std_rows(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation of each window, NaN where too few values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(windows, axis=1), np.nanstd(windows, axis=1, ddof=1)


def warmup_median(x: np.ndarray, rows: int) -> np.ndarray:
    """Causal warm-up baseline: median of the first ``min(i + 1, rows)`` values, per row i."""
    x = np.asarray(x, dtype=float)
    out = np.empty(len(x))
    for i in range(min(rows, len(x))):
        out[i] = np.median(x[: i + 1])
    if len(x) > rows:
        out[rows:] = np.median(x[:rows])
    return out


def _floats(column: pd.Series) -> np.ndarray:
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
