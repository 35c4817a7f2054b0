"""Samples that a long run can afford: the compressed payload (texts exact, log-probs within
the stated tolerance, sums kept), the retention policy, its live and ``klmon db compact``
applications, and migration 0008 converting stored rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

import monitor
from monitor.cli import main
from monitor.errors import ConfigError, InvalidInput
from monitor.store.database import Database
from monitor.store.drilldown import read_histograms, read_samples, sample_steps, write_samples
from monitor.store.engine import make_engine
from monitor.store.runs import get_or_create_run
from monitor.store.sample_codec import LOGPROB_TOLERANCE, decode_sample, encode_sample
from monitor.store.sample_retention import SampleRetention, compact_samples
from monitor.store.schema import upgrade
from monitor.store.step_writes import write_steps

ODD = ["caf\u00e9", "\U0001f600", " \u202eevil", "\ufffd", "a\u0301", "\u4e2d\u6587", "\t\n"]


def _close(got: list[float], want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, atol=LOGPROB_TOLERANCE * (1 + 1e-6), rtol=0)


# --- the payload -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lp=st.lists(st.floats(-60, 0, width=32), min_size=0, max_size=300),
    shift=st.floats(-3, 3),
    prompt=st.one_of(st.none(), st.text()),
    extra=st.text(max_size=5),
)
def test_payload_keeps_texts_exactly_and_logprobs_and_their_sums_within_tolerance(
    lp: list[float], shift: float, prompt: str | None, extra: str
) -> None:
    p = np.asarray(lp, dtype=np.float32)
    q = np.minimum(p + np.float32(shift), 0).astype(np.float32)
    tokens = [ODD[i % len(ODD)] + extra for i in range(p.size)]
    for response in ("".join(tokens), "something else"):
        d = decode_sample(encode_sample(p, q, prompt=prompt, response=response, tokens=tokens))
        assert d.prompt == prompt and d.response == response and d.tokens == tokens
        _close(d.policy_logprobs, p)
        _close(d.ref_logprobs, q)
        # every prefix sum of log p - log q (the drill-down's "sum of token log-ratios")
        want = np.cumsum(p.astype(np.float64) - q)
        assert np.abs(np.cumsum(d.policy_logprobs - d.ref_logprobs) - want).max(
            initial=0
        ) <= LOGPROB_TOLERANCE * (1 + 1e-6)


def test_payload_values_on_the_grid_come_back_exactly_and_lone_surrogates_survive() -> None:
    d = decode_sample(
        encode_sample(
            [-0.8, -0.4], [-1.5, -2.1], prompt="\udcff", response=None, tokens=["Good", "\udcff"]
        )
    )
    assert d.policy_logprobs.tolist() == [-0.8, -0.4]
    assert d.ref_logprobs.tolist() == [-1.5, -2.1]
    assert d.prompt == "\udcff" and d.response is None and d.tokens == ["Good", "\udcff"]
    assert d.token_ids is None


def test_payload_holds_token_ids_and_non_finite_values() -> None:
    ids = np.array([0, 7, 50_000, 2**31 + 5], dtype=np.int64)
    lp = [-0.5, float("nan"), -np.inf, -1.25]
    d = decode_sample(encode_sample(lp, [-0.5, -1.0, -2.0, float("inf")], token_ids=ids))
    assert d.token_ids.tolist() == ids.tolist() and d.tokens is None
    assert d.policy_logprobs[0] == -0.5 and math.isnan(d.policy_logprobs[1])
    assert d.policy_logprobs[2] == -np.inf and d.ref_logprobs[3] == np.inf
    assert d.policy_logprobs[3] == -1.25 and d.ref_logprobs[1] == -1.0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"policy_logprobs": [-1.0, -2.0], "ref_logprobs": [-1.0]}, "differ in length"),
        ({"policy_logprobs": [[-1.0]], "ref_logprobs": [[-1.0]]}, "must be 1-d"),
        ({"policy_logprobs": ["x"], "ref_logprobs": [-1.0]}, "policy_logprobs"),
        ({"policy_logprobs": [-1.0], "ref_logprobs": [-1.0], "token_ids": [-3]}, "token_ids"),
        ({"policy_logprobs": [-1.0], "ref_logprobs": [-1.0], "token_ids": [0.5]}, "token_ids"),
    ],
)
def test_payload_refuses_what_it_cannot_store(kwargs: dict, field: str) -> None:
    lp, ref = kwargs.pop("policy_logprobs"), kwargs.pop("ref_logprobs")
    with pytest.raises(InvalidInput, match=field):
        encode_sample(lp, ref, **kwargs)


def test_payload_of_an_unknown_format_says_to_upgrade() -> None:
    with pytest.raises(InvalidInput, match="upgrade klmon"):
        decode_sample(b"\x09" + encode_sample([-1.0], [-1.0])[1:])


def test_payload_is_several_times_smaller_than_the_json_it_replaces() -> None:
    rng = np.random.default_rng(0)
    lp = -rng.exponential(1.0, 2048).astype(np.float32)
    ref = np.minimum(lp + rng.normal(0, 0.2, 2048).astype(np.float32), 0)
    tokens = [f" w{int(i)}" for i in rng.zipf(1.3, 2048) % 50_000]
    response = "".join(tokens)
    as_json = sum(
        len(json.dumps(v))
        for v in (
            tokens,
            np.round(lp.astype(float), 6).tolist(),
            np.round(ref.astype(float), 6).tolist(),
        )
    ) + len(response)
    payload = encode_sample(lp, ref, prompt="p", response=response, tokens=tokens)
    assert len(payload) * 4 < as_json, (len(payload), as_json)


# --- the retention policy ------------------------------------------------------------------------


def test_retention_keeps_the_edge_then_every_2k_th_step_in_bands_of_doubling_width() -> None:
    policy = SampleRetention(recent=100, top_steps=0, around_alerts=0)
    steps = np.arange(0, 10_000)
    keep = policy.kept(steps, 9_999)
    assert keep[-100:].all()
    d = 9_999 - steps
    for k in range(1, 7):
        band = (d >= 100 * 2 ** (k - 1)) & (d < 100 * 2**k)
        assert (steps[band & keep] % 2**k == 0).all()
        assert abs(int((band & keep).sum()) - 50) <= 1
    # about recent * (1 + log2(L / recent) / 2) steps in all
    assert keep.sum() <= 100 * (1 + math.log2(10_000 / 100) / 2) + 10


@settings(max_examples=40, deadline=None)
@given(recent=st.integers(1, 64), last=st.integers(0, 5000), later=st.integers(0, 5000))
def test_a_step_dropped_once_is_never_kept_later(recent: int, last: int, later: int) -> None:
    policy = SampleRetention(recent=recent)
    steps = np.arange(0, last + 1)
    now, then = policy.kept(steps, last), policy.kept(steps, last + later)
    assert not (then & ~now).any()


def test_retention_specs_parse_and_bad_ones_name_the_problem(monkeypatch) -> None:
    assert SampleRetention.parse("recent=10, top=2") == SampleRetention(10, 2, 4)
    assert not SampleRetention.parse("off").enabled
    assert not SampleRetention.coerce(False).enabled
    monkeypatch.setenv("KLMON_SAMPLE_RETENTION", "around=9")
    assert SampleRetention.coerce(None) == SampleRetention(around_alerts=9)
    for spec, msg in [
        ("recent=x", "not an integer"),
        ("keep=3", "key one of"),
        ("recent=0", "at least 1"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            SampleRetention.parse(spec)


def _sample(kl: float, n: int = 4) -> dict:
    return {
        "seq_index": 0,
        "kind": "top",
        "kl_seq": kl,
        "policy_logprobs": np.full(n, -0.5),
        "ref_logprobs": np.full(n, -0.75),
        "tokens": ["a"] * n,
        "response": "a" * n,
    }


def _run_with_samples(db: Database, n_steps: int) -> int:
    run_id = get_or_create_run(db, "p", f"compact-{n_steps}").id
    write_steps(
        db, run_id, [{"step": s, "wall_time": float(s), "kl_mean": 0.1} for s in range(n_steps)]
    )
    write_samples(
        db,
        run_id,
        [
            {"step": s, **_sample(50.0 if s == 77 else -60.0 if s == 78 else 1.0)}
            for s in range(n_steps)
        ]
        + [{"step": s, "rank": 1, **_sample(0.5)} for s in range(n_steps)],
    )
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO alert_events (run_id, rule, detector, severity, state, start_step, "
                "message, causes, started_at, fired_step, peak_step, notified_firing, "
                "notified_resolved) VALUES (:r, 'kl-budget', 'budget', 'critical', 'firing', "
                "331, 'm', '[]', 0, 333, 341, true, false)"
            ),
            {"r": run_id},
        )
    return run_id


def test_compact_keeps_edge_bands_alerts_and_top_kl_and_never_touches_steps(db: Database) -> None:
    run_id = _run_with_samples(db, 1000)
    db_hist_before = read_histograms(db, run_id)[0].tolist()
    policy = SampleRetention(recent=100, top_steps=2, around_alerts=3)

    dry = compact_samples(db, policy, run_ids=[run_id], dry_run=True)[0]
    assert sample_steps(db, run_id) == list(range(1000)), "a dry run deletes nothing"
    [done] = compact_samples(db, policy, run_ids=[run_id])
    assert (done.rows_removed, done.steps_removed, done.bytes_removed) == (
        dry.rows_removed,
        dry.steps_removed,
        dry.bytes_removed,
    )
    kept = sample_steps(db, run_id)
    assert done.steps_kept == len(kept) and done.rows_removed == 2 * (1000 - len(kept))
    assert done.bytes_removed > 0
    expected = set(np.flatnonzero(policy.kept(np.arange(1000), 999)).tolist())
    around = {s + d for s in (331, 333, 341) for d in range(-3, 4)}
    assert set(kept) == expected | around | {77, 78}
    assert 337 not in kept and 335 in kept  # between the windows, an odd step far back
    # samples are the only thing removed; what is kept reads back as written
    with db.begin() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM steps WHERE run_id = :r"), {"r": run_id})
        assert n.scalar() == 1000
    assert read_histograms(db, run_id)[0].tolist() == db_hist_before
    [s] = [x for x in read_samples(db, run_id, 77) if x.rank == 0]
    assert s.kl_seq == 50.0 and s.tokens == ["a"] * 4 and s.ref_logprobs == [-0.75] * 4
    # compacting again finds nothing more to remove
    assert compact_samples(db, policy, run_ids=[run_id])[0].rows_removed == 0


def test_a_live_run_keeps_only_what_its_retention_keeps(db_url: str, tmp_path) -> None:
    rng = np.random.default_rng(1)
    lp = -rng.exponential(1.0, (4, 16)).astype(np.float32)
    ref = np.minimum(lp + 0.1, 0).astype(np.float32)
    policy = SampleRetention(recent=8, top_steps=0, around_alerts=0)
    with monitor.init(
        "p",
        "live-retention",
        db=db_url,
        spool_dir=tmp_path,
        sample_retention=policy,
        queue_size=1000,  # a queue too long to shed samples: every step keeps its own
    ) as run:
        for step in range(60):
            run.log_step(step, policy_logprobs=lp, ref_logprobs=ref)
        assert run.flush(30)
        run_id = run.id
    db = Database.open(db_url)
    kept = sample_steps(db, run_id)
    # compaction runs in the write of each batch whose newest step crosses a multiple of
    # recent // 4; what it kept then is the policy at that edge E, plus the steps after E
    edges = [
        e
        for e in range(8, 60)
        if set(np.flatnonzero(policy.kept(np.arange(e + 1), e)).tolist()) | set(range(e + 1, 60))
        == set(kept)
    ]
    assert edges and max(edges) >= 60 - policy.every, kept
    assert len(kept) < 30
    with db.begin() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM steps WHERE run_id = :r"), {"r": run_id})
        assert n.scalar() == 60
    db.dispose()


def test_klmon_db_compact_reports_what_it_removed(sqlite_db: Database, sqlite_url: str) -> None:
    run_id = _run_with_samples(sqlite_db, 300)
    args = ["db", "compact", "--db", sqlite_url, "--run", "p/compact-300"]
    dry = CliRunner().invoke(main, [*args, "--retention", "recent=50,top=0", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would remove" in dry.output and "kB" in dry.output
    assert len(sample_steps(sqlite_db, run_id)) == 300
    done = CliRunner().invoke(main, [*args, "--retention", "recent=50,top=0"])
    assert done.exit_code == 0, done.output
    assert f"run {run_id}: removed" in done.output
    assert len(sample_steps(sqlite_db, run_id)) < 150
    bad = CliRunner().invoke(main, [*args, "--retention", "recent=abc"])
    assert bad.exit_code != 0 and "not an integer" in bad.output


def test_klmon_db_compact_vacuum_gives_the_space_back(db_url: str) -> None:
    """Compacting frees pages that the database keeps for later rows; --vacuum gives them
    back (SQLite: the file; PostgreSQL: the samples table), and what is kept reads back."""
    db = Database.open(db_url)
    rng = np.random.default_rng(0)
    run_id = get_or_create_run(db, "p", "vacuum").id
    write_steps(db, run_id, [{"step": s, "wall_time": float(s)} for s in range(200)])
    texts = ["".join(rng.choice(list("abcdefghij"), 8000)) for _ in range(200)]  # ~3 kB zstd
    write_samples(
        db, run_id, [{"step": s, **_sample(1.0), "response": texts[s]} for s in range(200)]
    )
    args = ["db", "compact", "--db", db_url, "--retention", "recent=20,top=0"]
    both = CliRunner().invoke(main, [*args, "--dry-run", "--vacuum"])
    assert both.exit_code != 0 and "--dry-run deletes nothing" in both.output
    done = CliRunner().invoke(main, [*args, "--vacuum"])
    assert done.exit_code == 0, done.output
    what = "database file" if db.is_sqlite else "samples table"
    line = next(x for x in done.output.splitlines() if x.startswith(f"{what}: "))
    unit = {"kB": 1e3, "MB": 1e6}
    before, after = (
        float(n) * unit[u] for n, u in (v.split() for v in line.split(": ")[1].split(" -> "))
    )
    assert after < 0.6 * before, line  # the schema's own pages stay
    kept = sample_steps(db, run_id)
    assert 20 <= len(kept) < 60
    assert read_samples(db, run_id, kept[-1])[0].response == texts[kept[-1]]
    db.dispose()


def test_vacuum_reports_the_sqlite_files_on_disk_with_another_connection_open(
    sqlite_db: Database,
) -> None:
    """In WAL mode a VACUUM's rebuilt file waits in the write-ahead log: the size reported
    is what is on disk after the checkpoint, file and log, while another connection is open."""
    from monitor.store.engine import sqlite_file
    from monitor.store.sample_retention import reclaim_space

    run_id = get_or_create_run(sqlite_db, "p", "wal").id
    write_steps(sqlite_db, run_id, [{"step": s, "wall_time": float(s)} for s in range(100)])
    blob = "".join(np.random.default_rng(1).choice(list("abcdefghij"), 8000))
    write_samples(
        sqlite_db, run_id, [{"step": s, **_sample(1.0), "response": blob} for s in range(100)]
    )
    compact_samples(sqlite_db, SampleRetention(recent=5, top_steps=0), run_ids=[run_id])
    other = Database.open(sqlite_db.url)
    with other.begin() as conn:  # a reader's connection, left open in its pool
        conn.execute(text("SELECT COUNT(*) FROM samples")).scalar_one()
    before, after = reclaim_space(sqlite_db)
    path = sqlite_file(sqlite_db.url)
    assert path is not None
    wal = path.with_name(path.name + "-wal")
    on_disk = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    assert after == on_disk and after < 0.6 * before
    other.dispose()


def test_vacuum_full_gives_up_behind_an_open_transaction_and_blocks_nothing_after(
    pg_migrated_url: str,
) -> None:
    """PostgreSQL's VACUUM FULL waits for every open transaction on the table, and every new
    reader waits behind it: it gives up after its lock timeout instead."""
    from monitor.errors import StoreError
    from monitor.store.sample_retention import reclaim_space

    db = Database.open(pg_migrated_url)
    run_id = get_or_create_run(db, "p", "held").id
    write_samples(db, run_id, [{"step": s, **_sample(1.0)} for s in range(10)])
    count = text("SELECT COUNT(*) FROM samples WHERE run_id = :r")
    holder = make_engine(pg_migrated_url)
    with holder.connect() as held:
        held.execute(count, {"r": run_id}).scalar_one()  # its transaction stays open
        with pytest.raises(StoreError, match="an open transaction held the samples table"):
            reclaim_space(db, lock_timeout=0.5)
        with db.begin() as conn:  # readers are not left queued behind it
            assert conn.execute(count, {"r": run_id}).scalar_one() == 10
        held.rollback()
        before, after = reclaim_space(db)
    assert after <= before
    holder.dispose()
    db.dispose()


def test_vacuum_as_a_role_that_does_not_own_the_samples_table_says_so(
    pg_migrated_url: str,
) -> None:
    """PostgreSQL only warns and skips the table: the command said "672 kB -> 672 kB"."""
    import uuid

    from monitor.errors import StoreError
    from monitor.store.sample_retention import reclaim_space

    role = f"klmon_guest_{uuid.uuid4().hex[:10]}"
    admin = make_engine(pg_migrated_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # a role that reads klmon's tables, as a dashboard's may
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(text(f'GRANT SELECT, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'))
    base, _, rest = pg_migrated_url.partition("://")
    guest = Database.open(f"{base}://{role}@{rest.split('@', 1)[1]}")
    try:
        with pytest.raises(StoreError, match="only the owner of the samples table"):
            reclaim_space(guest)
    finally:
        guest.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))  # its grants
            conn.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()


# --- migration 0008 ------------------------------------------------------------------------------


def test_migration_0008_converts_stored_samples(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine, "0006")
    tokens = ["caf\u00e9", " \U0001f600", "\u202e", "\u4e2d"]
    lp = [-0.8, -0.4123456, -12.5, -0.0001]
    ref = [-1.5, -2.1, -0.3333333, -3.0]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (id, project, name, status, source, created_at, last_seen_at, "
                "world_size, config, tags) VALUES (1, 'p', 'old', 'finished', 'live', 0, 0, 1, "
                "'{}', '[]')"
            )
        )
        for i in range(3):  # more than one row, one without tokens or texts
            conn.execute(
                text(
                    "INSERT INTO samples (run_id, step, rank, seq_index, kind, kl_seq, reward, "
                    "prompt, response, tokens, policy_logprobs, ref_logprobs) VALUES (1, :s, 0, "
                    ":i, 'top', 2.4, NULL, :p, :r, :t, :lp, :ref)"
                ),
                {
                    "s": 5,
                    "i": i,
                    "p": None if i == 2 else "prompt \u00e9",
                    "r": None if i == 2 else "".join(tokens),
                    "t": None if i == 2 else json.dumps(tokens),
                    "lp": json.dumps(lp),
                    "ref": json.dumps(ref),
                },
            )
    upgrade(engine)
    engine.dispose()
    db = Database.open(empty_db_url)
    got = sorted(read_samples(db, 1, 5), key=lambda s: s.seq_index)
    db.dispose()
    assert len(got) == 3
    for s in got[:2]:
        assert s.tokens == tokens and s.prompt == "prompt \u00e9" and s.response == "".join(tokens)
        _close(s.policy_logprobs, np.array(lp))
        _close(s.ref_logprobs, np.array(ref))
        assert s.kl_seq == 2.4
    assert got[2].tokens is None and got[2].prompt is None and got[2].response is None


# --- readers see what was logged -----------------------------------------------------------------


def test_logged_samples_read_back_as_logged_on_the_run_page_and_in_emails(
    db_url: str, tmp_path
) -> None:
    """Through ``log_step``: texts and tokens exactly as the ingest boundary cleans them (NUL
    removed, lone surrogates U+FFFD), log-probs within the tolerance; the run page's token
    cells and the email's top tokens are those of the logged arrays."""
    from monitor.alerts.render import top_tokens
    from monitor.charts.tables import token_cells
    from monitor.ingest.text import clean_strings, clean_text

    rng = np.random.default_rng(3)
    b, t = 6, 24
    lp = -rng.exponential(1.0, (b, t)).astype(np.float32)
    ref = np.minimum(lp + rng.normal(0, 0.5, (b, t)), 0).astype(np.float32)
    odd = [*ODD, "nul\x00", "\udcff", "\U0001f469\u200d\U0001f52c"]
    tokens = [[odd[(i + j) % len(odd)] for j in range(t)] for i in range(b)]
    prompts = [f"prompt\x00 {i} \udc80\u00e9" for i in range(b)]
    responses = ["".join(row) for row in tokens]
    with monitor.init("p", "readers", db=db_url, spool_dir=tmp_path) as run:
        run.log_step(
            0, policy_logprobs=lp, ref_logprobs=ref, texts=(prompts, responses), tokens=tokens
        )
        assert run.flush(20)
        run_id = run.id
    db = Database.open(db_url)
    samples = read_samples(db, run_id, 0)
    db.dispose()
    assert len(samples) == 5
    for s in samples:
        i = s.seq_index
        assert s.tokens == clean_strings(tokens[i])
        assert s.prompt == clean_text(prompts[i]) and s.response == clean_text(responses[i])
        _close(s.policy_logprobs, lp[i])
        _close(s.ref_logprobs, ref[i])
        shown = token_cells(s.tokens, s.policy_logprobs, s.ref_logprobs)
        logged = token_cells(clean_strings(tokens[i]), lp[i].tolist(), ref[i].tolist())
        assert [c.text for c in shown] == [c.text for c in logged]
        assert max(abs(a.diff - b.diff) for a, b in zip(shown, logged, strict=True)) <= 2e-4
        assert sum(c.diff for c in shown) == pytest.approx(sum(c.diff for c in logged), abs=1e-4)
        emailed = [tok for tok, _ in top_tokens(s, k=3)]
        ratio = lp[i].astype(float) - ref[i]
        assert emailed == [s.tokens[j] for j in np.argsort(-ratio, kind="stable")[:3]]


def test_migration_0008_downgrades_to_the_json_columns(empty_db_url: str) -> None:
    from alembic import command

    from monitor.store.schema import alembic_config

    engine = make_engine(empty_db_url)
    upgrade(engine)
    db = Database.open(empty_db_url)
    run_id = get_or_create_run(db, "p", "down").id
    write_samples(db, run_id, [{"step": 3, **_sample(1.5), "prompt": "\u00e9"}])
    db.dispose()
    command.downgrade(alembic_config(engine), "0006")
    with engine.connect() as conn:
        prompt, tokens, lp, ref = conn.execute(
            text("SELECT prompt, tokens, policy_logprobs, ref_logprobs FROM samples")
        ).one()
    engine.dispose()
    load = lambda v: json.loads(v) if isinstance(v, str) else v  # noqa: E731
    assert prompt == "\u00e9" and load(tokens) == ["a"] * 4
    assert load(lp) == [-0.5] * 4 and load(ref) == [-0.75] * 4
