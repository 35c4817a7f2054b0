"""The store: every SQL statement of klmon, behind plain functions that take a ``Database``
and return domain objects or DataFrames (never ORM rows).

The names in ``__all__`` are what the other layers use; import them from ``monitor.store``.
They load on first use (PEP 562), so ``from monitor.store import Database`` costs what
importing ``monitor.store.database`` costs, not the whole store with pandas (the CLI's
start-up time). The submodules stay importable for what is not listed here
(``monitor.store.alerts`` for the alert engine's state and outbox, ``monitor.store.tables``
for the schema, ``monitor.store.models`` for the ORM classes the alert engine queries with).
``monitor.store.current_kl`` is a module; its function ``current_kl`` is reached through it.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_HOME: dict[str, str] = {
    "AlertEvent": "alerts",
    "Notification": "alerts",
    "acknowledge_event": "alerts",
    "event_markers": "alerts",
    "list_events": "alerts",
    "list_notifications": "alerts",
    "list_silences": "alerts",
    "open_event_counts": "alerts",
    "silence": "alerts",
    "unsilence": "alerts",
    "CurrentKL": "current_kl",
    "KLQuantity": "current_kl",
    "best_kl": "current_kl",
    "Database": "database",
    "Annotation": "domain",
    "RunInfo": "domain",
    "Sample": "domain",
    "StepWriteResult": "domain",
    "add_annotation": "drilldown",
    "annotation_markers": "drilldown",
    "annotations_frame": "drilldown",
    "list_annotations": "drilldown",
    "nearest_sample_step": "drilldown",
    "read_samples": "drilldown",
    "sample_step_range": "drilldown",
    "sample_steps": "drilldown",
    "worst_samples": "drilldown",
    "write_histograms": "drilldown",
    "write_samples": "drilldown",
    "normalize_url": "engine",
    "redact_url": "engine",
    "sqlite_file": "engine",
    "MetricInfo": "metric_info",
    "described_metric_names": "metric_info",
    "read_metric_info": "metric_info",
    "write_metric_info": "metric_info",
    "METRIC_NAME_MAX": "tables",
    "STEP_COLUMNS": "tables",
    "STEP_FLOAT_COLUMNS": "tables",
    "STEP_INT_COLUMNS": "tables",
    "STEP_MAX": "tables",
    "STEP_QUANTITIES": "tables",
    "CompactResult": "sample_retention",
    "SampleRetention": "sample_retention",
    "compact_samples": "sample_retention",
    "reclaim_space": "sample_retention",
    "count_runs_outside": "runs",
    "delete_project_runs": "runs",
    "delete_run": "runs",
    "find_run_by_name": "runs",
    "get_or_create_run": "runs",
    "get_run": "runs",
    "get_runs": "runs",
    "list_run_ids": "runs",
    "list_runs": "runs",
    "resolve_run": "runs",
    "run_summaries": "runs",
    "run_summaries_at": "run_list",
    "set_baseline_run": "runs",
    "set_run_status": "runs",
    "touch_run": "runs",
    "current_revision": "schema",
    "ensure_schema": "schema",
    "head_revision": "schema",
    "upgrade": "schema",
    "DEFAULT_MAX_BUCKETS": "series",
    "MAX_STEP": "series",
    "Series": "series",
    "read_histogram_columns": "series",
    "read_metric_rows_after": "series",
    "read_metric_series": "series",
    "read_series": "series",
    "read_step_rows_after": "series",
    "refresh_rollups": "series",
    "RECENT_STEPS": "run_counters",
    "recent_walls": "run_counters",
    "IngestResult": "step_writes",
    "MetricWriteResult": "step_writes",
    "StepRecord": "step_writes",
    "write_metric_columns": "step_writes",
    "write_metric_records": "step_writes",
    "write_metrics": "step_writes",
    "write_step_frame": "step_writes",
    "write_step_records": "step_writes",
    "write_steps": "step_writes",
    "write_imported_ledgers": "step_writes",
    "latest_steps": "steps",
    "metric_names": "steps",
    "read_metrics": "steps",
    "read_metrics_by_suffix": "steps",
    "read_metrics_long": "steps",
    "read_steps": "steps",
    "steps_with_data": "steps",
    "stored_between": "steps",
    "BUCKET_COLUMNS": "vocabulary",
    "CHANGE_COLUMNS": "vocabulary",
    "LEDGER_COLUMNS": "vocabulary",
    "read_token_ledger": "vocabulary",
    "read_token_ledger_buckets": "vocabulary",
    "token_changes": "vocabulary",
    "token_changes_between_runs": "vocabulary",
    "StepVocabulary": "vocabulary_notes",
    "step_vocabulary": "vocabulary_notes",
    "refresh_ledger_rollups": "ledger_rollups",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'monitor.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"monitor.store.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
