"""Storage benchmark: database bytes per logged step with the default drill-down samples
(3 top + 2 random sequences per step), before and after the compact sample payload and the
sample retention, measured in the same run on SQLite (file growth, WAL checkpointed) and
PostgreSQL (growth of ``pg_total_relation_size`` over the schema's tables).

The steps are made once by the live client's own record builder (``summarize_item``, what
the processor thread appends to the spool, then ``to_step_record``, what the committer
writes) from (256, 2048) batches like ``bench_ingest.py``'s (log p ~ -Exp(1), log q = log p
+ N(0, 0.2), response lengths uniform in [512, 2048]) with texts and token strings drawn from
a Zipf-distributed 32k-word vocabulary (the response text is its tokens joined). They are
then written, in committer-sized batches, to fresh databases:

- ``before``: the samples table of revision 0006 (prompt and response as text; tokens and the two
  log-prob lists as JSON, floats rounded to 6 decimals), written the way that code wrote it;
- ``payload``: the compressed payload (``monitor/store/sample_codec.py``), every step's
  samples kept;
- ``payload+retention``: the same with the default ``SampleRetention`` compacting as the run
  grows (what ``monitor.init`` does by default);
- ``no samples``: ``samples_top=samples_random=0``, the floor (step row, histogram, metrics).

It prints bytes per step and the projection for 10k and 1M steps (step rows at the measured
per-step cost, samples at the measured per-sampled-step cost times the steps the retention
keeps), and the committer-side seconds spent writing the 1k steps (the payloads come
encoded by the record builder, as the processor thread encodes them; revision 0006's JSON is
encoded by the committer).

    .venv/bin/python benchmarks/bench_storage.py               # 1000 steps, SQLite + PostgreSQL
    .venv/bin/python benchmarks/bench_storage.py --steps 300 --no-pg --texts ingest
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_ingest import _drop_pg, _fresh_pg, _fresh_sqlite

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEP_S = 0.02  # a step every 20 ms, as bench_ingest.py logs them
HEADER = {"project": "bench", "name": "storage", "rank": 0, "world_size": 1}


# --- the steps ---------------------------------------------------------------------------------


def _vocabulary(rng: np.random.Generator, n: int = 32_000) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1.0 / np.arange(1, 27)
    p /= p.sum()
    words = []
    for i in range(n):
        w = "".join(rng.choice(letters, size=int(rng.integers(1, 9)), p=p))
        words.append((" " if i % 5 else "") + w)
    return np.array(words, dtype=object)


def make_records(steps: int, b: int, t: int, samples: bool, texts: str = "vocab") -> list[Any]:
    """The step records the committer would write, from the live client's record builder,
    each sample with its fields as revision 0006 took them next to its payload. ``texts``:
    "vocab" (Zipf words, the response is its tokens joined) or "ingest"
    (``bench_ingest.py``'s: tokens ``tok{j}``, texts ``prompt {i}``/``response {i}``)."""
    from monitor.ingest.apply import to_step_record
    from monitor.ingest.records import StepItem, WriterConfig, summarize_item

    rng = np.random.default_rng(0)
    vocab = _vocabulary(rng)
    batches = []
    for _ in range(8):
        lp = -rng.exponential(1.0, (b, t)).astype(np.float32)
        ref = np.minimum(lp + rng.normal(0, 0.2, (b, t)).astype(np.float32), 0.0)
        lengths = rng.integers(t // 4, t + 1, size=b)
        mask = np.arange(t)[None, :] < lengths[:, None]
        if texts == "ingest":
            tokens = [[f"tok{j}" for j in range(t)] for _ in range(b)]
            responses = [f"response {i}" for i in range(b)]
            prompts = [f"prompt {i}" for i in range(b)]
        else:
            ids = (rng.zipf(1.2, (b, t)) - 1) % len(vocab)
            tokens = [vocab[row].tolist() for row in ids]
            responses = ["".join(tok[:n]) for tok, n in zip(tokens, lengths, strict=True)]
            prompts = ["".join(vocab[(rng.zipf(1.2, 200) - 1) % len(vocab)]) for _ in range(b)]
        batches.append((lp, ref, mask, rng.normal(size=b), tokens, prompts, responses))
    cfg = WriterConfig() if samples else WriterConfig(samples_top=0, samples_random=0)
    out = []
    for step in range(steps):
        lp, ref, mask, rewards, tokens, prompts, responses = batches[step % len(batches)]
        item = StepItem(
            step=step,
            wall_time=1.7e9 + step,
            policy_logprobs=lp,
            ref_logprobs=ref,
            mask=mask,
            rewards=rewards,
            kl_coef=0.05,
            texts=(prompts, responses),
            tokens=tokens,
            metrics={"loss/policy": 0.1, "lr": 1e-6},
        )
        record = summarize_item(item, HEADER, cfg)
        for sample in record["samples"]:  # what revision 0006 stored (``_old_sample_rows``)
            i = sample["seq_index"]
            pos = np.flatnonzero(mask[i])
            sample.update(
                prompt=prompts[i],
                response=responses[i],
                tokens=[tokens[i][j] for j in pos],
                policy_logprobs=lp[i, pos],
                ref_logprobs=ref[i, pos],
            )
        out.append(to_step_record(record))
    return out


# --- the databases -----------------------------------------------------------------------------


def _fresh(kind: str, name: str, directory: Path, old_samples: bool) -> str | None:
    """A new database at head (bench_ingest's helpers); ``old_samples``: its samples table as
    revision 0006 had it (the rest at head, so that today's step writes run on it)."""
    from monitor.store.engine import make_engine

    url = _fresh_sqlite(directory, name + ".db") if kind == "sqlite" else _fresh_pg(name)
    if url is not None and old_samples:
        engine = make_engine(url)
        _samples_of_0006(engine)
        engine.dispose()
    return url


def _samples_of_0006(engine: Any) -> None:
    """Replace the samples table with revision 0006's (texts, JSON tokens and log-probs),
    reflected from a throwaway SQLite database migrated to 0006."""
    import sqlalchemy as sa

    from monitor.store.engine import make_engine
    from monitor.store.schema import upgrade

    with tempfile.TemporaryDirectory() as tmp:
        old = make_engine(f"sqlite:///{Path(tmp) / 'r0006.db'}")
        upgrade(old, "0006")
        meta = sa.MetaData()
        meta.reflect(old, only=["runs", "samples"])
        old.dispose()
    samples = meta.tables["samples"]
    for column in samples.columns:  # SQLite reflects JSON as JSON, other types generically
        column.type = (
            column.type.as_generic() if not isinstance(column.type, sa.JSON) else sa.JSON()
        )
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE samples")
        samples.create(conn)


def _size(db: Any) -> int:
    """Bytes the database takes: the SQLite file after a WAL checkpoint, or the sum of
    pg_total_relation_size (heap, TOAST, indexes) over the public tables."""
    with db.engine.connect() as conn:
        if db.is_sqlite:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            return os.path.getsize(db.engine.url.database)
        return int(
            conn.exec_driver_sql(
                "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'r'"
            ).scalar()
        )


def _old_sample_rows(run_id: int, records: list[Any]) -> list[tuple[Any, ...]]:
    """The samples rows as revision 0006 stored them (``_insert_samples`` of that code)."""

    def js(v: Any) -> str:
        if isinstance(v, np.ndarray):
            v = np.round(v.astype(np.float64), 6).tolist() if v.dtype.kind == "f" else v.tolist()
        return json.dumps(list(v))

    return [
        (
            run_id,
            r.step,
            r.rank,
            s["seq_index"],
            s["kind"],
            s["kl_seq"],
            s.get("reward"),
            s.get("prompt"),
            s.get("response"),
            None if s.get("tokens") is None else js(s["tokens"]),
            js(s["policy_logprobs"]),
            js(s["ref_logprobs"]),
        )
        for r in records
        for s in r.samples
    ]


_OLD_COLUMNS = (
    "run_id",
    "step",
    "rank",
    "seq_index",
    "kind",
    "kl_seq",
    "reward",
    "prompt",
    "response",
    "tokens",
    "policy_logprobs",
    "ref_logprobs",
)


def _vacuumed_size(db: Any) -> int:
    """``_size`` after VACUUM (SQLite) / VACUUM FULL (PostgreSQL): the live data, without the
    space of deleted rows that new rows would reuse (on PostgreSQL once autovacuum ran)."""
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM" if db.is_sqlite else "VACUUM FULL")
    return _size(db)


def write_variant(url: str, records: list[Any], variant: str) -> tuple[int, int, float, int]:
    """Write the records as ``variant``; (bytes grown, bytes grown after a VACUUM, seconds
    writing, sampled steps kept)."""
    from dataclasses import replace

    from monitor.ingest.records import WriterConfig
    from monitor.store._bulk import insert_rows
    from monitor.store.database import Database
    from monitor.store.drilldown import sample_steps
    from monitor.store.runs import get_or_create_run
    from monitor.store.sample_retention import SampleRetention
    from monitor.store.step_writes import write_step_records

    batch_steps = round(WriterConfig().flush_interval / STEP_S)  # records per transaction
    db = Database.open(url, check=False)
    run_id = get_or_create_run(db, "bench", variant).id
    before = _size(db)
    retention = SampleRetention() if variant == "payload+retention" else None
    t0 = time.perf_counter()
    for i in range(0, len(records), batch_steps):
        batch = records[i : i + batch_steps]
        if variant == "before":
            write_step_records(db, run_id, [replace(r, samples=()) for r in batch])
            with db.begin() as conn:
                insert_rows(conn, "samples", _OLD_COLUMNS, _old_sample_rows(run_id, batch))
        else:
            write_step_records(db, run_id, batch, retention=retention)
    seconds = time.perf_counter() - t0
    grown = _size(db) - before
    live = _vacuumed_size(db) - before
    with db.begin() as conn:
        kept = conn.exec_driver_sql(
            f"SELECT COUNT(DISTINCT step) FROM samples WHERE run_id = {int(run_id)}"
        ).scalar()
    assert variant == "before" or len(sample_steps(db, run_id)) == kept
    db.dispose()
    return grown, live, seconds, int(kept or 0)


# --- the report --------------------------------------------------------------------------------


def kept_steps(n: int) -> int:
    """Steps whose samples the default retention keeps in a run of n steps (edge, bands and
    the top-KL steps; alerts add 2 * around + 1 steps per start/fired/peak mark)."""
    from monitor.store.sample_retention import SampleRetention

    policy = SampleRetention()
    return int(policy.kept(np.arange(n), n - 1).sum()) + policy.top_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, nargs=2, default=(256, 2048), metavar=("B", "T"))
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument(
        "--texts",
        choices=("vocab", "ingest"),
        default="vocab",
        help="token strings and texts: Zipf words (default) or bench_ingest.py's tok{j}",
    )
    args = ap.parse_args()
    b, t = args.batch
    print(
        f"making {args.steps} step records of ({b}, {t}), texts {args.texts!r}, with the live "
        "record builder ..."
    )
    t0 = time.perf_counter()
    records = make_records(args.steps, b, t, samples=True, texts=args.texts)
    bare = make_records(args.steps, b, t, samples=False, texts=args.texts)
    print(f"  {time.perf_counter() - t0:.0f} s; shared 2-core machine: timings are noisy\n")

    kinds = ["sqlite"] + ([] if args.no_pg else ["postgresql"])
    variants = [
        ("before", True, records),
        ("payload", False, records),
        ("payload+retention", False, records),
        ("no samples", False, bare),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            results: dict[str, tuple[int, float, int]] = {}
            for label, old_samples, recs in variants:
                name = f"klmon_bench_storage_{label.replace(' ', '_').replace('+', '_')}"
                url = _fresh(kind, name, Path(tmp), old_samples)
                if url is None:
                    break
                results[label] = write_variant(url, recs, label)
                if kind == "postgresql":
                    _drop_pg(name)
            if results:
                _report(kind, args.steps, results)


def _report(kind: str, steps: int, results: dict[str, tuple[int, int, float, int]]) -> None:
    floor = results["no samples"][1] / steps
    per_sampled = (results["payload"][1] - results["no samples"][1]) / steps
    before = results["before"][1] / steps
    print(f"{kind}: {steps} steps, default samples (3 top + 2 random)")
    print(
        f"  {'layout':<20} {'kB/step grown':>14} {'after VACUUM':>13} {'write s':>8} "
        f"{'steps with samples':>19}"
    )
    for label, (grown, live, seconds, kept) in results.items():
        print(
            f"  {label:<20} {grown / steps / 1e3:>14.1f} {live / steps / 1e3:>13.1f} "
            f"{seconds:>8.2f} {kept:>19}"
        )
    print(
        f"  per sampled step: {per_sampled / 1e3:.1f} kB payload (before: "
        f"{(before - floor) / 1e3:.1f} kB JSON); step row + histogram + metrics "
        f"{floor / 1e3:.2f} kB"
    )
    for n in (10_000, 1_000_000):
        k = min(n, kept_steps(n))
        after = n * floor + k * per_sampled
        print(
            f"  projection {n:>9,} steps: before {n * before / 1e9:8.2f} GB, "
            f"after {after / 1e9:6.3f} GB ({after / n / 1e3:.2f} kB/step; {k} steps keep "
            f"samples, plus {2 * 4 + 1} per alert mark)"
        )
    print()


if __name__ == "__main__":
    main()
