"""SQLAlchemy 2 models: the tables of docs/ARCHITECTURE.md.

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
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class RunRow(Base):
    """A training run: one policy being trained against one frozen reference."""

    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("project", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    # running | finished | crashed   ("stalled" is derived from last_seen_at, never stored)
    status: Mapped[str] = mapped_column(String(20), default="running")
    # live | import:<format> | demo
    source: Mapped[str] = mapped_column(String(50), default="live")
    created_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    world_size: Mapped[int] = mapped_column(Integer, default=1)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    baseline_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("runs.id", ondelete="SET NULL"), nullable=True
    )
    # Counters kept by the step writers (``monitor/store/run_counters.py``) so that listing
    # runs never counts their steps: how many steps, the last one, and per step column of
    # ``run_list.LAST_STEP_COLUMNS`` (the KL ones, reward_mean) the last step with a value.
    n_steps: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_kl_mean_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_k3_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_k1_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_k2_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_reward_mean_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # JSON [[step, wall_time], ...] of the run's latest steps, newest first (run_counters.
    # RECENT_STEPS of them): the stall rule's step interval without reading step rows.
    recent_walls: Mapped[str | None] = mapped_column(Text, nullable=True)


class StepRow(Base):
    """One row per (run, step): the summary quantities. status is ok | partial | rejected."""

    __tablename__ = "steps"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    wall_time: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(10), default="ok")
    reject_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    ranks_seen: Mapped[int] = mapped_column(Integer, default=1)
    # Digest of what was logged, so a replay is a no-op and a different payload a conflict.
    payload_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)

    kl_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    kl_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    kl_min: Mapped[float | None] = mapped_column(Float, nullable=True)
    kl_p05: Mapped[float | None] = mapped_column(Float, nullable=True)
    kl_p50: Mapped[float | None] = mapped_column(Float, nullable=True)
    kl_p95: Mapped[float | None] = mapped_column(Float, nullable=True)
    kl_p99: Mapped[float | None] = mapped_column(Float, nullable=True)
    kl_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    k1: Mapped[float | None] = mapped_column(Float, nullable=True)
    k2: Mapped[float | None] = mapped_column(Float, nullable=True)
    k3: Mapped[float | None] = mapped_column(Float, nullable=True)
    neg_kl_frac: Mapped[float | None] = mapped_column(Float, nullable=True)
    top1pct_share: Mapped[float | None] = mapped_column(Float, nullable=True)
    resp_len_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    policy_nll: Mapped[float | None] = mapped_column(Float, nullable=True)
    entropy_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    kl_coef: Mapped[float | None] = mapped_column(Float, nullable=True)
    rollout_gap: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_sequences: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    vocab_top_share: Mapped[float | None] = mapped_column(Float, nullable=True)


class StepShardRow(Base):
    """One rank's partial statistics for a step of a multi-rank run, kept until every rank
    has arrived (and afterwards, so a merged step can be recomputed exactly)."""

    __tablename__ = "step_shards"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    wall_time: Mapped[float] = mapped_column(Float)
    payload_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    partials: Mapped[dict[str, Any]] = mapped_column(JSON)


class MetricBlockRow(Base):
    """Extra named scalars (trainer loss, lr, imported keys) of one run and one name over the
    128 aligned steps ``block * 128 .. block * 128 + 127``: a bitmap of the steps that have a
    value and the values packed as little-endian float64 (NaN: NULL). See
    ``monitor/store/metric_blocks.py``."""

    __tablename__ = "metric_blocks"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(METRIC_NAME_MAX), primary_key=True)
    block: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    step_min: Mapped[int] = mapped_column(BigInteger)
    step_max: Mapped[int] = mapped_column(BigInteger)
    mask: Mapped[bytes] = mapped_column(LargeBinary)
    vals: Mapped[bytes] = mapped_column(LargeBinary)


class MetricInfoRow(Base):
    """What an extra metric means: its source, the estimator and scale of a KL-like key, and
    the klmon quantity it stands for when the user mapped it (``--map kl_vs_ref=kl_mean``)."""

    __tablename__ = "metric_info"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(METRIC_NAME_MAX), primary_key=True)
    source: Mapped[str | None] = mapped_column(String(50), nullable=True)
    quantity: Mapped[str | None] = mapped_column(String(50), nullable=True)
    estimator: Mapped[str | None] = mapped_column(String(20), nullable=True)
    scale: Mapped[str | None] = mapped_column(String(20), nullable=True)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)


class SampleRow(Base):
    """A stored sequence for token-level drill-down (kind: top | random). ``payload`` holds
    its prompt, response, tokens and per-token log-probs, compressed
    (``monitor/store/sample_codec.py``); ``kl_seq`` is the full-precision sequence KL."""

    __tablename__ = "samples"
    __table_args__ = (Index("ix_samples_run_step", "run_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[int] = mapped_column(Integer, default=0)
    seq_index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(10))
    kl_seq: Mapped[float] = mapped_column(Float)
    reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class TokenHistogramRow(Base):
    """Counts of per-token log-ratios in the fixed bins of ``monitor.divergence.HIST_EDGES``."""

    __tablename__ = "token_histograms"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    counts: Mapped[list[Any]] = mapped_column(JSON)


class TokenLedgerRow(Base):
    """One token id of a step's ledger: how often the step's masked tokens were that id and
    the sum of their ``log p - log q``. A step keeps its top K ids by positive and by
    negative sum (``monitor.divergence.ledger.top_rows``; at most 2 K rows)."""

    __tablename__ = "token_ledger"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    token_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    lr_sum: Mapped[float] = mapped_column(Float)


class TokenLedgerStepRow(Base):
    """The whole ledger's masses of a step with a token ledger: ``pos_mass`` (sum over ids of
    max(lr_sum, 0)) and ``neg_mass`` (of min(lr_sum, 0)), so the stored rows' shares are
    exact; ``n_tokens``: the masked tokens counted."""

    __tablename__ = "token_ledger_steps"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    pos_mass: Mapped[float] = mapped_column(Float)
    neg_mass: Mapped[float] = mapped_column(Float)


class TokenLedgerRollupRow(Base):
    """One token id of a bucket of 2**level steps of a run's ledger: the sums of its stored
    step rows (``n_steps`` of them), kept when the id ranks in the bucket's top ``ROLLUP_K``
    by positive or by negative sum (``monitor/store/ledger_rollups.py``)."""

    __tablename__ = "token_ledger_rollups"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    token_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    lr_sum: Mapped[float] = mapped_column(Float)
    n_steps: Mapped[int] = mapped_column(Integer)


class TokenLedgerRollupMassRow(Base):
    """A bucket of 2**level steps of a run's ledger: its steps with a ledger, tokens and
    masses (exact sums of ``token_ledger_steps``); also the rollups' frontier per level."""

    __tablename__ = "token_ledger_rollup_masses"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n_steps: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    pos_mass: Mapped[float] = mapped_column(Float)
    neg_mass: Mapped[float] = mapped_column(Float)


class TokenVocabRow(Base):
    """The text of a token id of a run, stored for the ids that appear in its ledgers."""

    __tablename__ = "token_vocab"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    token_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)


class AlertEventRow(Base):
    """One episode of a rule on a run: pending -> firing -> resolved."""

    __tablename__ = "alert_events"
    __table_args__ = (
        Index("ix_alert_events_run_rule", "run_id", "rule"),
        Index("ix_alert_events_state", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    rule: Mapped[str] = mapped_column(String(100))
    detector: Mapped[str] = mapped_column(String(50))
    severity: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20))
    start_step: Mapped[int] = mapped_column(BigInteger)
    end_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str] = mapped_column(Text)
    causes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    started_at: Mapped[float] = mapped_column(Float)
    fired_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    resolved_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    acknowledged_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    acknowledged_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    notified_firing: Mapped[bool] = mapped_column(Boolean, default=False)
    notified_resolved: Mapped[bool] = mapped_column(Boolean, default=False)
    # Added by 0002_alerts: the step it fired at, the threshold it crossed, and the last step
    # the condition held with the value there (start_step is where it went pending).
    fired_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Added by 0004_alert_peak: the episode's peak level (the KL, not a z-score) and its
    # step; the level at which it escalates next, the step of its latest escalation and the
    # escalation step its notifications have announced.
    peak_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    peak_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    escalate_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    escalated_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    escalation_notified_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class AlertCursorRow(Base):
    """Per run: the last step the alert engine evaluated. ``version`` makes the advance a
    compare-and-set, so two evaluators never both record the same transition."""

    __tablename__ = "alert_cursors"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    evaluated_at: Mapped[float] = mapped_column(Float)


class AlertStateRow(Base):
    """Per (run, rule): ok | pending | firing | nodata, with the step counters the next
    evaluation continues from and the open episode (alert_events row), if any."""

    __tablename__ = "alert_states"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    rule: Mapped[str] = mapped_column(String(100), primary_key=True)
    state: Mapped[str] = mapped_column(String(20))
    hold_steps: Mapped[int] = mapped_column(Integer, default=0)
    clear_steps: Mapped[int] = mapped_column(Integer, default=0)
    event_id: Mapped[int | None] = mapped_column(
        ForeignKey("alert_events.id", ondelete="SET NULL"), nullable=True
    )
    since_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
    # Added by 0004_alert_peak: rows left in the re-fire cool-down after a resolve.
    cooldown_left: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AlertSilenceRow(Base):
    """While ``until`` is in the future, no notification goes out for the run (and rule, when
    given); states are still tracked."""

    __tablename__ = "alert_silences"
    __table_args__ = (Index("ix_alert_silences_run_until", "run_id", "until"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    rule: Mapped[str | None] = mapped_column(String(100), nullable=True)
    until: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class AlertNotificationRow(Base):
    """The outbox: a rendered notification, marked sent only after the channel accepted it.
    status is pending | sent | dead (gave up after too many attempts). A watcher sending a
    row holds a lease on it: ``claimed_by`` (host:pid:random) until ``claimed_until``."""

    __tablename__ = "alert_notifications"
    __table_args__ = (Index("ix_alert_notifications_status_next", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), nullable=True
    )
    channel: Mapped[str] = mapped_column(String(20))
    subject: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    event_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(10), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    claimed_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # after last_error, where its migration (0005) added it: a new database created from the
    # models has the migrated column order (``schema.create_schema``)
    claimed_by: Mapped[str | None] = mapped_column(String(100), nullable=True)


class AnnotationRow(Base):
    """A post-mortem note on a run at a step."""

    __tablename__ = "annotations"
    __table_args__ = (Index("ix_annotations_run_step", "run_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    text: Mapped[str] = mapped_column(Text)
    author: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


# Chart rollups (monitor/store/series.py): min, max and mean of every float step quantity over
# buckets of 2**level consecutive steps (bucket = step >> level), levels 3..30 (7..30 for the
# extra metrics, whose blocks hold 128 steps: lower levels are computed on read), so a chart read
# costs the same for 1k and 10M steps. A cache of the steps and metrics tables, written lazily
# for complete buckets. ``stats`` packs the statistics as little-endian float64
# [quantity][min, max, mean] in STEP_FLOAT_COLUMNS order (one quantity, ``value``, for
# metric_rollups): one blob instead of 60 columns, so the bulk build binds one value per row.
# Columns are only ever appended to STEP_FLOAT_COLUMNS; a shorter blob reads as NaN for the
# newer ones.


class StepRollupRow(Base):
    """Min/max/mean of a run's step quantities over one bucket of 2**level steps."""

    __tablename__ = "step_rollups"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    step_min: Mapped[int] = mapped_column(BigInteger)
    step_max: Mapped[int] = mapped_column(BigInteger)
    wall_min: Mapped[float | None] = mapped_column(Float, nullable=True)
    wall_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    stats: Mapped[bytes] = mapped_column(LargeBinary)


class MetricRollupRow(Base):
    """Min/max/mean of one extra metric of a run over one bucket of 2**level steps."""

    __tablename__ = "metric_rollups"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(METRIC_NAME_MAX), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    step_min: Mapped[int] = mapped_column(BigInteger)
    step_max: Mapped[int] = mapped_column(BigInteger)
    wall_min: Mapped[float | None] = mapped_column(Float, nullable=True)
    wall_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    stats: Mapped[bytes] = mapped_column(LargeBinary)
