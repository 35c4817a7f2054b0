"""The tables of docs/ARCHITECTURE.md, as SQLAlchemy Core ``Table`` objects: the one home of
the schema (``schema.create_schema`` creates a new database from ``metadata``, Alembic's
autogenerate compares the migrations with it).

Core, not the ORM: the write paths (``klmon import``, the live committer) bind tuples through
the driver and never need mapped classes, so they do not pay for loading ``sqlalchemy.orm``
and mapping every class (about 0.15 s of a fresh process). The ORM classes that some readers
query with are mapped onto these tables in ``monitor.store.models``.

Portable across SQLite and PostgreSQL: JSON columns, no server-side functions, integer
surrogate keys only where a natural key does not exist. Wall times are stored as Unix
seconds (float) because they are written at high rate and compared, never formatted, in SQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from monitor.divergence import SCALAR_FIELDS

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# The per-step summary quantities, in the order they are stored: exactly what
# monitor.divergence computes (n_sequences and n_tokens are integers, the rest floats).
STEP_QUANTITIES: tuple[str, ...] = SCALAR_FIELDS
STEP_INT_COLUMNS: tuple[str, ...] = ("n_sequences", "n_tokens")
STEP_FLOAT_COLUMNS: tuple[str, ...] = tuple(c for c in SCALAR_FIELDS if c not in STEP_INT_COLUMNS)
#: Every column of a ``steps`` row, in the order the bulk writes use.
STEP_COLUMNS: tuple[str, ...] = (
    "run_id",
    "step",
    "wall_time",
    "status",
    "reject_reason",
    "ranks_seen",
    "payload_hash",
    *STEP_QUANTITIES,
)

# Longest metric name the metrics tables hold (VARCHAR), and the largest step (BIGINT).
METRIC_NAME_MAX = 200
STEP_MAX = 2**63 - 1

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _run_id(**kw: Any) -> Column[int]:
    """The ``run_id`` column of a table that hangs off a run (deleted with it)."""
    return Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), **kw)


# A training run: one policy being trained against one frozen reference. ``status``:
# running | finished | crashed ("stalled" is derived from last_seen_at, never stored);
# ``source``: live | import:<format> | demo. The step writers keep the counters
# (``monitor/store/run_counters.py``) so that listing runs never counts their steps: how many
# steps, the last one, and per step column of ``run_list.LAST_STEP_COLUMNS`` (the KL ones,
# reward_mean) the last step with a value; ``recent_walls``: JSON [[step, wall_time], ...] of
# the run's latest steps, newest first (``run_counters.RECENT_STEPS`` of them), the stall
# rule's step interval without reading step rows.
runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", String(200), nullable=False),
    Column("name", String(200), nullable=False),
    Column("status", String(20), nullable=False, default="running"),
    Column("source", String(50), nullable=False, default="live"),
    Column("created_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    Column("world_size", Integer, nullable=False, default=1),
    Column("config", JSON, nullable=False, default=dict),
    Column("tags", JSON, nullable=False, default=list),
    Column("baseline_run_id", Integer, ForeignKey("runs.id", ondelete="SET NULL"), nullable=True),
    Column("n_steps", BigInteger, nullable=False, default=0, server_default="0"),
    Column("last_step", BigInteger, nullable=True),
    Column("last_kl_mean_step", BigInteger, nullable=True),
    Column("last_k3_step", BigInteger, nullable=True),
    Column("last_k1_step", BigInteger, nullable=True),
    Column("last_k2_step", BigInteger, nullable=True),
    Column("last_reward_mean_step", BigInteger, nullable=True),
    Column("recent_walls", Text, nullable=True),
    UniqueConstraint("project", "name"),
)

# One row per (run, step): the summary quantities. status is ok | partial | rejected;
# ``payload_hash`` digests what was logged, so a replay is a no-op and a different payload a
# conflict.
steps = Table(
    "steps",
    metadata,
    _run_id(primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("wall_time", Float, nullable=False),
    Column("status", String(10), nullable=False, default="ok"),
    Column("reject_reason", Text, nullable=True),
    Column("ranks_seen", Integer, nullable=False, default=1),
    Column("payload_hash", String(64), nullable=True),
    Column("kl_mean", Float, nullable=True),
    Column("kl_std", Float, nullable=True),
    Column("kl_min", Float, nullable=True),
    Column("kl_p05", Float, nullable=True),
    Column("kl_p50", Float, nullable=True),
    Column("kl_p95", Float, nullable=True),
    Column("kl_p99", Float, nullable=True),
    Column("kl_max", Float, nullable=True),
    Column("k1", Float, nullable=True),
    Column("k2", Float, nullable=True),
    Column("k3", Float, nullable=True),
    Column("neg_kl_frac", Float, nullable=True),
    Column("top1pct_share", Float, nullable=True),
    Column("resp_len_mean", Float, nullable=True),
    Column("policy_nll", Float, nullable=True),
    Column("entropy_mean", Float, nullable=True),
    Column("reward_mean", Float, nullable=True),
    Column("reward_std", Float, nullable=True),
    Column("kl_coef", Float, nullable=True),
    Column("rollout_gap", Float, nullable=True),
    Column("n_sequences", Integer, nullable=True),
    Column("n_tokens", BigInteger, nullable=True),
    Column("vocab_top_share", Float, nullable=True),
)

# One rank's partial statistics for a step of a multi-rank run, kept until every rank has
# arrived (and afterwards, so a merged step can be recomputed exactly).
step_shards = Table(
    "step_shards",
    metadata,
    _run_id(primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("wall_time", Float, nullable=False),
    Column("payload_hash", String(64), nullable=True),
    Column("partials", JSON, nullable=False),
)

# Extra named scalars (trainer loss, lr, imported keys) of one run and one name over the 128
# aligned steps ``block * 128 .. block * 128 + 127``: a bitmap of the steps that have a value
# and the values packed as little-endian float64 (NaN: NULL). See
# ``monitor/store/metric_blocks.py``.
metric_blocks = Table(
    "metric_blocks",
    metadata,
    _run_id(primary_key=True),
    Column("name", String(METRIC_NAME_MAX), primary_key=True),
    Column("block", BigInteger, primary_key=True),
    Column("n", Integer, nullable=False),
    Column("step_min", BigInteger, nullable=False),
    Column("step_max", BigInteger, nullable=False),
    Column("mask", LargeBinary, nullable=False),
    Column("vals", LargeBinary, nullable=False),
)

# What an extra metric means: its source, the estimator and scale of a KL-like key, and the
# klmon quantity it stands for when the user mapped it (``--map kl_vs_ref=kl_mean``).
metric_info = Table(
    "metric_info",
    metadata,
    _run_id(primary_key=True),
    Column("name", String(METRIC_NAME_MAX), primary_key=True),
    Column("source", String(50), nullable=True),
    Column("quantity", String(50), nullable=True),
    Column("estimator", String(20), nullable=True),
    Column("scale", String(20), nullable=True),
    Column("description", Text, nullable=True),
)

# A stored sequence for token-level drill-down (kind: top | random). ``payload`` holds its
# prompt, response, tokens and per-token log-probs, compressed
# (``monitor/store/sample_codec.py``); ``kl_seq`` is the full-precision sequence KL.
samples = Table(
    "samples",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _run_id(nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("rank", Integer, nullable=False, default=0),
    Column("seq_index", Integer, nullable=False),
    Column("kind", String(10), nullable=False),
    Column("kl_seq", Float, nullable=False),
    Column("reward", Float, nullable=True),
    Column("payload", LargeBinary, nullable=False),
    Index("ix_samples_run_step", "run_id", "step"),
)

# Counts of per-token log-ratios in the fixed bins of ``monitor.divergence.HIST_EDGES``.
token_histograms = Table(
    "token_histograms",
    metadata,
    _run_id(primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("counts", JSON, nullable=False),
)

# One token id of a step's ledger: how often the step's masked tokens were that id and the
# sum of their ``log p - log q``. A step keeps its top K ids by positive and by negative sum
# (``monitor.divergence.ledger.top_rows``; at most 2 K rows).
token_ledger = Table(
    "token_ledger",
    metadata,
    _run_id(primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("token_id", BigInteger, primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("lr_sum", Float, nullable=False),
)

# The whole ledger's masses of a step with a token ledger: ``pos_mass`` (sum over ids of
# max(lr_sum, 0)) and ``neg_mass`` (of min(lr_sum, 0)), so the stored rows' shares are
# exact; ``n_tokens``: the masked tokens counted.
token_ledger_steps = Table(
    "token_ledger_steps",
    metadata,
    _run_id(primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("n_tokens", BigInteger, nullable=False),
    Column("pos_mass", Float, nullable=False),
    Column("neg_mass", Float, nullable=False),
)

# One token id of a bucket of 2**level steps of a run's ledger: the sums of its stored step
# rows (``n_steps`` of them), kept when the id ranks in the bucket's top ``ROLLUP_K`` by
# positive or by negative sum (``monitor/store/ledger_rollups.py``).
token_ledger_rollups = Table(
    "token_ledger_rollups",
    metadata,
    _run_id(primary_key=True),
    Column("level", Integer, primary_key=True),
    Column("bucket", BigInteger, primary_key=True),
    Column("token_id", BigInteger, primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("lr_sum", Float, nullable=False),
    Column("n_steps", Integer, nullable=False),
)

# A bucket of 2**level steps of a run's ledger: its steps with a ledger, tokens and masses
# (exact sums of ``token_ledger_steps``); also the rollups' frontier per level.
token_ledger_rollup_masses = Table(
    "token_ledger_rollup_masses",
    metadata,
    _run_id(primary_key=True),
    Column("level", Integer, primary_key=True),
    Column("bucket", BigInteger, primary_key=True),
    Column("n_steps", Integer, nullable=False),
    Column("n_tokens", BigInteger, nullable=False),
    Column("pos_mass", Float, nullable=False),
    Column("neg_mass", Float, nullable=False),
)

# The text of a token id of a run, stored for the ids that appear in its ledgers.
token_vocab = Table(
    "token_vocab",
    metadata,
    _run_id(primary_key=True),
    Column("token_id", BigInteger, primary_key=True),
    Column("text", Text, nullable=True),
)

# One episode of a rule on a run: pending -> firing -> resolved. Added by 0002_alerts: the
# step it fired at, the threshold it crossed, and the last step the condition held with the
# value there (start_step is where it went pending). Added by 0004_alert_peak: the episode's
# peak level (the KL, not a z-score) and its step; the level at which it escalates next, the
# step of its latest escalation and the escalation step its notifications have announced.
alert_events = Table(
    "alert_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _run_id(nullable=False),
    Column("rule", String(100), nullable=False),
    Column("detector", String(50), nullable=False),
    Column("severity", String(20), nullable=False),
    Column("state", String(20), nullable=False),
    Column("start_step", BigInteger, nullable=False),
    Column("end_step", BigInteger, nullable=True),
    Column("value", Float, nullable=True),
    Column("message", Text, nullable=False),
    Column("causes", JSON, nullable=False, default=list),
    Column("started_at", Float, nullable=False),
    Column("fired_at", Float, nullable=True),
    Column("resolved_at", Float, nullable=True),
    Column("acknowledged_at", Float, nullable=True),
    Column("acknowledged_by", String(200), nullable=True),
    Column("notified_firing", Boolean, nullable=False, default=False),
    Column("notified_resolved", Boolean, nullable=False, default=False),
    Column("fired_step", BigInteger, nullable=True),
    Column("threshold", Float, nullable=True),
    Column("last_step", BigInteger, nullable=True),
    Column("last_value", Float, nullable=True),
    Column("peak_value", Float, nullable=True),
    Column("peak_step", BigInteger, nullable=True),
    Column("escalate_at", Float, nullable=True),
    Column("escalated_step", BigInteger, nullable=True),
    Column("escalation_notified_step", BigInteger, nullable=True),
    Index("ix_alert_events_run_rule", "run_id", "rule"),
    Index("ix_alert_events_state", "state"),
)

# Per run: the last step the alert engine evaluated. ``version`` makes the advance a
# compare-and-set, so two evaluators never both record the same transition.
alert_cursors = Table(
    "alert_cursors",
    metadata,
    _run_id(primary_key=True),
    Column("last_step", BigInteger, nullable=True),
    Column("version", Integer, nullable=False, default=0),
    Column("evaluated_at", Float, nullable=False),
)

# Per (run, rule): ok | pending | firing | nodata, with the step counters the next
# evaluation continues from and the open episode (alert_events row), if any.
# ``cooldown_left`` (0004_alert_peak): rows left in the re-fire cool-down after a resolve.
alert_states = Table(
    "alert_states",
    metadata,
    _run_id(primary_key=True),
    Column("rule", String(100), primary_key=True),
    Column("state", String(20), nullable=False),
    Column("hold_steps", Integer, nullable=False, default=0),
    Column("clear_steps", Integer, nullable=False, default=0),
    Column("event_id", Integer, ForeignKey("alert_events.id", ondelete="SET NULL"), nullable=True),
    Column("since_step", BigInteger, nullable=True),
    Column("updated_at", Float, nullable=False),
    Column("cooldown_left", Integer, nullable=False, default=0, server_default="0"),
)

# While ``until`` is in the future, no notification goes out for the run (and rule, when
# given); states are still tracked.
alert_silences = Table(
    "alert_silences",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _run_id(nullable=False),
    Column("rule", String(100), nullable=True),
    Column("until", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=True),
    Column("reason", Text, nullable=True),
    Index("ix_alert_silences_run_until", "run_id", "until"),
)

# The outbox: a rendered notification, marked sent only after the channel accepted it.
# status is pending | sent | dead (gave up after too many attempts). A watcher sending a row
# holds a lease on it: ``claimed_by`` (host:pid:random) until ``claimed_until``; it comes
# after last_error, where its migration (0005) added it, so a new database created from
# this metadata has the migrated column order (``schema.create_schema``).
alert_notifications = Table(
    "alert_notifications",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _run_id(nullable=True),
    Column("channel", String(20), nullable=False),
    Column("subject", Text, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("event_ids", JSON, nullable=False, default=list),
    Column("status", String(10), nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("claimed_until", Float, nullable=True),
    Column("sent_at", Float, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("claimed_by", String(100), nullable=True),
    Index("ix_alert_notifications_status_next", "status", "next_attempt_at"),
)

# A post-mortem note on a run at a step.
annotations = Table(
    "annotations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _run_id(nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("text", Text, nullable=False),
    Column("author", String(200), nullable=True),
    Column("created_at", Float, nullable=False),
    Index("ix_annotations_run_step", "run_id", "step"),
)

# Chart rollups (monitor/store/series.py): min, max and mean of every float step quantity
# over buckets of 2**level consecutive steps (bucket = step >> level), levels 3..30 (7..30
# for the extra metrics, whose blocks hold 128 steps: lower levels are computed on read), so
# a chart read costs the same for 1k and 10M steps. A cache of the steps and metrics tables,
# written lazily for complete buckets. ``stats`` packs the statistics as little-endian
# float64 [quantity][min, max, mean] in STEP_FLOAT_COLUMNS order (one quantity, ``value``,
# for metric_rollups): one blob instead of 60 columns, so the bulk build binds one value per
# row. Columns are only ever appended to STEP_FLOAT_COLUMNS; a shorter blob reads as NaN for
# the newer ones.
step_rollups = Table(
    "step_rollups",
    metadata,
    _run_id(primary_key=True),
    Column("level", Integer, primary_key=True),
    Column("bucket", BigInteger, primary_key=True),
    Column("n", Integer, nullable=False),
    Column("step_min", BigInteger, nullable=False),
    Column("step_max", BigInteger, nullable=False),
    Column("wall_min", Float, nullable=True),
    Column("wall_max", Float, nullable=True),
    Column("stats", LargeBinary, nullable=False),
)

# Min/max/mean of one extra metric of a run over one bucket of 2**level steps.
metric_rollups = Table(
    "metric_rollups",
    metadata,
    _run_id(primary_key=True),
    Column("name", String(METRIC_NAME_MAX), primary_key=True),
    Column("level", Integer, primary_key=True),
    Column("bucket", BigInteger, primary_key=True),
    Column("n", Integer, nullable=False),
    Column("step_min", BigInteger, nullable=False),
    Column("step_max", BigInteger, nullable=False),
    Column("wall_min", Float, nullable=True),
    Column("wall_max", Float, nullable=True),
    Column("stats", LargeBinary, nullable=False),
)
