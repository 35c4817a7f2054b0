"""Samples, token histograms and annotations: what the run page drills down into."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Row, func, insert, select, text

from monitor.errors import InvalidInput, NotFound
from monitor.store._bulk import insert_rows
from monitor.store.database import Database
from monitor.store.domain import Annotation, Sample
from monitor.store.runs import run_exists
from monitor.store.sample_codec import decode_sample, encode_sample
from monitor.store.tables import annotations, samples, token_histograms

if TYPE_CHECKING:
    import pandas as pd

SAMPLE_COLUMNS = (
    "run_id",
    "step",
    "rank",
    "seq_index",
    "kind",
    "kl_seq",
    "reward",
    "payload",
)


def sample_rows(
    run_id: int, groups: Iterable[tuple[int, int, Iterable[Mapping[str, Any]]]]
) -> list[tuple[Any, ...]]:
    """``samples`` rows (``SAMPLE_COLUMNS`` order) of (step, rank, samples) groups; each
    sample a dict with seq_index, kind, kl_seq, optionally reward, and either its ``payload``
    (encoded already, as the live writer's processor does) or what ``_payload`` encodes."""
    return [
        (
            run_id,
            int(step),
            int(rank),
            int(s["seq_index"]),
            str(s["kind"]),
            s["kl_seq"],
            s.get("reward"),
            s.get("payload") or _payload(s),
        )
        for step, rank, samples in groups
        for s in samples
    ]


def _payload(s: Mapping[str, Any]) -> bytes:
    """The payload of a sample given as the two log-prob arrays and optionally prompt,
    response, tokens (strings) and token_ids (``sample_codec``; importers, the demo, spool
    files of klmon before payloads)."""
    return encode_sample(
        s["policy_logprobs"],
        s["ref_logprobs"],
        prompt=s.get("prompt"),
        response=s.get("response"),
        tokens=s.get("tokens"),
        token_ids=s.get("token_ids"),
    )


def write_samples(db: Database, run_id: int, samples: Sequence[dict[str, Any]]) -> int:
    """Insert samples: dicts with step, rank (default 0) and the fields of ``sample_rows``."""
    if not samples:
        return 0
    rows = sample_rows(run_id, [(s["step"], s.get("rank", 0), [s]) for s in samples])
    with db.begin() as conn:
        insert_rows(conn, "samples", SAMPLE_COLUMNS, rows)
    return len(rows)


def read_samples(db: Database, run_id: int, step: int) -> list[Sample]:
    """The stored samples of a step, highest KL first."""
    with db.begin() as conn:
        rows = conn.execute(
            select(samples)
            .where(samples.c.run_id == run_id, samples.c.step == step)
            .order_by(samples.c.kl_seq.desc())
        ).all()
    return [_to_sample(r) for r in rows]


def _to_sample(r: Row[Any]) -> Sample:
    d = decode_sample(r.payload)
    return Sample(
        id=r.id,
        run_id=r.run_id,
        step=r.step,
        rank=r.rank,
        seq_index=r.seq_index,
        kind=r.kind,
        kl_seq=r.kl_seq,
        reward=r.reward,
        prompt=d.prompt,
        response=d.response,
        tokens=d.tokens,
        policy_logprobs=d.policy_logprobs.tolist(),
        ref_logprobs=d.ref_logprobs.tolist(),
        token_ids=None if d.token_ids is None else d.token_ids.tolist(),
    )


def worst_samples(
    db: Database,
    run_id: int,
    start: int | None,
    end: int | None,
    k: int,
    *,
    alert_steps: Sequence[int] = (),
) -> list[Sample]:
    """The samples a post-mortem wants to read, at most ``k``, one per step: first, for each
    step where an alert fired (``alert_steps``), the sample of largest |KL| at the first
    stored step from there; then the samples of the range with the largest |KL| (the most
    negative too: a negative sequence KL is a log-prob mismatch worth seeing)."""

    def in_range(q: Any) -> Any:
        q = q.where(samples.c.run_id == run_id)
        if start is not None:
            q = q.where(samples.c.step >= start)
        if end is not None:
            q = q.where(samples.c.step <= end)
        return q

    by_size = (func.abs(samples.c.kl_seq).desc(), samples.c.id)
    out: list[Sample] = []
    seen: set[int] = set()
    with db.begin() as conn:
        for step in list(dict.fromkeys(int(x) for x in alert_steps))[:k]:
            first = conn.execute(
                in_range(select(func.min(samples.c.step))).where(samples.c.step >= step)
            ).scalar()
            if first is None or int(first) in seen:
                continue
            row = conn.execute(
                select(samples)
                .where(samples.c.run_id == run_id, samples.c.step == first)
                .order_by(*by_size)
                .limit(1)
            ).first()
            if row is not None:
                seen.add(row.step)
                out.append(_to_sample(row))
        if len(out) < k:
            for r in conn.execute(in_range(select(samples)).order_by(*by_size).limit(50 * k)):
                if r.step in seen:
                    continue
                seen.add(r.step)
                out.append(_to_sample(r))
                if len(out) >= k:
                    break
    return sorted(out, key=lambda smp: smp.step)


def sample_steps(db: Database, run_id: int) -> list[int]:
    """Steps of a run that have stored samples."""
    with db.begin() as conn:
        rows = conn.execute(
            text("SELECT DISTINCT step FROM samples WHERE run_id = :run ORDER BY step"),
            {"run": run_id},
        ).all()
    return [int(r[0]) for r in rows]


def write_histograms(db: Database, run_id: int, hists: Sequence[tuple[int, Sequence[int]]]) -> int:
    """Insert (step, counts) token histograms; an existing (run, step) is left alone."""
    if not hists:
        return 0
    tuples = [(run_id, int(step), json.dumps([int(c) for c in counts])) for step, counts in hists]
    with db.begin() as conn:
        return insert_rows(
            conn, "token_histograms", ("run_id", "step", "counts"), tuples, key=("run_id", "step")
        )


def read_histograms(
    db: Database, run_id: int, *, start: int | None = None, end: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, counts[n_steps, n_bins]) for a run, sorted by step."""
    q = select(token_histograms.c.step, token_histograms.c.counts).where(
        token_histograms.c.run_id == run_id
    )
    if start is not None:
        q = q.where(token_histograms.c.step >= start)
    if end is not None:
        q = q.where(token_histograms.c.step <= end)
    with db.begin() as conn:
        rows = conn.execute(q.order_by(token_histograms.c.step)).all()
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.int64)
    steps = np.array([r[0] for r in rows], dtype=np.int64)
    return steps, np.array([r[1] for r in rows], dtype=np.int64)


def add_annotation(
    db: Database, run_id: int, step: int, text_: str, *, author: str | None = None
) -> Annotation:
    if not text_ or not text_.strip():
        raise InvalidInput("annotation text is empty")
    if len(text_) > 10_000:
        raise InvalidInput(f"annotation text is {len(text_)} characters: at most 10000")
    values = {
        "run_id": run_id,
        "step": int(step),
        "text": text_,
        "author": author,
        "created_at": time.time(),
    }
    with db.begin() as conn:
        if not run_exists(conn, run_id):
            raise NotFound(f"run {run_id} does not exist")
        created = conn.execute(insert(annotations).values(**values))
    return Annotation(created.inserted_primary_key[0], **values)


def list_annotations(db: Database, run_id: int) -> list[Annotation]:
    q = select(annotations).where(annotations.c.run_id == run_id)
    with db.begin() as conn:
        rows = conn.execute(q.order_by(annotations.c.step)).all()
    return [_to_annotation(r) for r in rows]


def _to_annotation(r: Row[Any]) -> Annotation:
    return Annotation(r.id, r.run_id, r.step, r.text, r.author, r.created_at)


def annotations_frame(db: Database, run_ids: Sequence[int]) -> pd.DataFrame:
    """Annotations of several runs: run_id, step, text, author, created_at."""
    import pandas as pd  # here: the step writers that load this module do without it

    rows = [a for rid in run_ids for a in list_annotations(db, rid)]
    return pd.DataFrame(
        [(a.run_id, a.step, a.text, a.author, a.created_at) for a in rows],
        columns=["run_id", "step", "text", "author", "created_at"],
    )


def annotation_markers(db: Database, run_ids: Sequence[int], limit: int) -> list[Annotation]:
    """At most ``limit`` annotations of the runs, by step (one query, for chart markers)."""
    ids = [int(r) for r in run_ids]
    if not ids:
        return []
    q = select(annotations).where(annotations.c.run_id.in_(ids))
    with db.begin() as conn:
        rows = conn.execute(q.order_by(annotations.c.step).limit(int(limit))).all()
    return [_to_annotation(r) for r in rows]


def nearest_sample_step(
    db: Database, run_id: int, step: int | None, direction: int = 0
) -> int | None:
    """A step with stored samples: the nearest to ``step`` (``direction`` 0; the latest
    when ``step`` is None), the last before it (-1) or the first after it (+1). Index
    lookups: a run may hold samples at a million steps."""
    where = "FROM samples WHERE run_id = :r"
    params: dict[str, Any] = {"r": int(run_id)}
    with db.begin() as conn:

        def one(sql: str) -> int | None:
            v = conn.execute(text(sql), params).scalar()
            return None if v is None else int(v)

        if step is None:
            return one(f"SELECT MAX(step) {where}")
        params["s"] = int(step)
        if direction < 0:
            return one(f"SELECT MAX(step) {where} AND step < :s")
        if direction > 0:
            return one(f"SELECT MIN(step) {where} AND step > :s")
        below = one(f"SELECT MAX(step) {where} AND step <= :s")
        above = one(f"SELECT MIN(step) {where} AND step >= :s")
    found = [x for x in (below, above) if x is not None]
    return min(found, key=lambda x: (abs(x - int(step)), x)) if found else None


def sample_step_range(db: Database, run_id: int) -> tuple[int | None, int | None]:
    """The first and last step with stored samples (None, None without any)."""
    with db.begin() as conn:
        row = conn.execute(
            text(
                "SELECT (SELECT MIN(step) FROM samples WHERE run_id = :r), "
                "(SELECT MAX(step) FROM samples WHERE run_id = :r)"
            ),
            {"r": int(run_id)},
        ).one()
    return (None if row[0] is None else int(row[0]), None if row[1] is None else int(row[1]))
