"""Trends and detectors on a run's step table: DataFrame in, findings out.

Pure: nothing here touches the store, the dashboard or the alert engine. The step table
is sorted by ``step`` with the columns of docs/ARCHITECTURE.md (``kl_mean`` ... ``n_tokens``,
``status``, ``reject_reason``, ``wall_time``) plus any extra metrics (``length_drift``
reads a ``*clipped_ratio`` column when there is one).

Example::

    from monitor.analytics import DETECTORS, RunContext, compute_trends
    ctx = RunContext(config={"target_kl": 6.0}, status="running", last_seen_at=t, now=now)
    for finding in DETECTORS["spike"](steps_df, ctx):
        print(finding.step, finding.message)
    compute_trends(steps_df, ctx)[["step", "kl_ewma", "budget_cross_step"]]
"""

from monitor.analytics.detectors import (
    DEFAULT_PARAMS,
    DETECTORS,
    INPUTS,
    has_inputs,
    lookback_rows,
)
from monitor.analytics.detectors.behaviour import CLIPPED_SUFFIX
from monitor.analytics.findings import Finding, RunContext, as_context
from monitor.analytics.series import KL_PREFERENCE, pick_kl
from monitor.analytics.trends import (
    compute_trends,
    expanding_slope,
    forecast_crossing,
    halflife_ewma,
    resolve_budget,
    rolling_slope,
)

# Extra metrics (matched by name suffix) that detectors read next to the step columns: a
# caller that builds the step table from a store should join them in.
EXTRA_METRIC_SUFFIXES: tuple[str, ...] = (CLIPPED_SUFFIX,)

__all__ = [
    "DEFAULT_PARAMS",
    "DETECTORS",
    "EXTRA_METRIC_SUFFIXES",
    "INPUTS",
    "KL_PREFERENCE",
    "Finding",
    "RunContext",
    "as_context",
    "compute_trends",
    "expanding_slope",
    "forecast_crossing",
    "halflife_ewma",
    "has_inputs",
    "lookback_rows",
    "pick_kl",
    "resolve_budget",
    "rolling_slope",
]
