"""Plain domain objects returned by the store (never ORM rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    """A training run as stored."""

    id: int
    project: str
    name: str
    status: str
    source: str
    created_at: float
    last_seen_at: float
    finished_at: float | None
    world_size: int
    config: dict[str, Any] = field(default_factory=dict)
    tags: list[Any] = field(default_factory=list)
    baseline_run_id: int | None = None


@dataclass(frozen=True)
class StepWriteResult:
    """What a batch write did: new rows, exact replays (no-ops), and refused conflicts."""

    inserted: int
    duplicates: int
    conflicts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Annotation:
    id: int
    run_id: int
    step: int
    text: str
    author: str | None
    created_at: float


@dataclass(frozen=True)
class Sample:
    """A stored sequence with its per-token log-probs, for token-level drill-down."""

    id: int
    run_id: int
    step: int
    rank: int
    seq_index: int
    kind: str
    kl_seq: float
    reward: float | None
    prompt: str | None
    response: str | None
    tokens: list[str] | None
    policy_logprobs: list[float]
    ref_logprobs: list[float]
    token_ids: list[int] | None = None
    """Token ids, when the trainer logged ids (strings then come from the run's vocabulary)."""
