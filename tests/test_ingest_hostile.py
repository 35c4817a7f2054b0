"""Hostile values in log_step: whatever a step holds, it ends stored, stored as rejected with
the reason, or refused at the call with InvalidInput naming the field, and the steps around
it are always written, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

import monitor
from monitor.errors import InvalidInput
from monitor.ingest.spool import SpoolRecord, iter_records
from monitor.store.database import Database
from monitor.store.drilldown import read_samples
from monitor.store.engine import make_engine
from monitor.store.runs import find_run_by_name, resolve_run
from monitor.store.sample_codec import decode_sample
from monitor.store.steps import read_metrics, read_steps


def _batch(seed: int, b: int = 3, t: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (b, t))
    return {"policy_logprobs": lp, "ref_logprobs": np.minimum(lp + 0.1, 0.0)}


def _stored(db_url: str, project: str, name: str):
    db = Database.open(db_url)
    try:
        info = find_run_by_name(db, project, name)
        assert info is not None, f"run {project}/{name} not stored"
        return read_steps(db, info.id), read_metrics(db, info.id), info
    finally:
        db.dispose()


def test_surrogates_and_nul_never_cost_the_steps_around_them(db_url: str, tmp_path) -> None:
    run = monitor.init(
        "hostile",
        "strings-\udcff",
        db=db_url,
        spool_dir=tmp_path / "spool",
        config={"note\udcff": "a\x00b", "tags": ["\ud800"]},
        tags=["t\x00"],
        samples_top=3,
        samples_random=0,
    )
    run.log_step(0, **_batch(0))
    run.log_step(1, **_batch(1), texts=(["p\udcffq"] * 3, ["r"] * 3))
    run.log_step(2, **_batch(2), texts=(["p\x00q"] * 3, ["r\x00"] * 3))
    run.log_step(3, **_batch(3), metrics={"m\udcff": 1.5})
    run.log_step(4, **_batch(4), tokens=[["a\udcff", "b\x00", "c", "d", "e"]] * 3)
    with pytest.raises(InvalidInput, match=r"metric name 'm\\x00x' contains a NUL"):
        run.log_step(5, **_batch(5), metrics={"m\x00x": 1.0})
    run.log_step(5, **_batch(5))
    run.log_step(6, **_batch(6))
    assert run.finish(timeout=30)
    assert run.stats["dead_letter"] == 0 and run.stats["dropped"] == 0

    steps, metrics, info = _stored(db_url, "hostile", "strings-\ufffd")
    assert steps["step"].tolist() == list(range(7))
    assert set(steps["status"]) == {"ok"}
    assert metrics["step"].tolist() == [3] and metrics["m\ufffd"].tolist() == [1.5]
    assert info.config == {"note\ufffd": "ab", "tags": ["\ufffd"]}
    db = Database.open(db_url)
    try:
        s1 = read_samples(db, info.id, 1)
        assert {s.prompt for s in s1} == {"p\ufffdq"}
        s2 = read_samples(db, info.id, 2)
        assert {(s.prompt, s.response) for s in s2} == {("pq", "r")}
        s4 = read_samples(db, info.id, 4)
        assert len(s4) == 3
        assert all(list(s.tokens) == ["a\ufffd", "b", "c", "d", "e"] for s in s4)
    finally:
        db.dispose()


@pytest.mark.parametrize(
    ("project", "name", "message"),
    [
        ("p", "n" * 201, "name is 201 characters long: at most 200"),
        ("p" * 300, "n", "project is 300 characters long: at most 200"),
        ("p", "a\x00b", "name 'a\\\\x00b' contains a NUL"),
        ("p", "  ", "name must be a non-empty string"),
    ],
)
def test_run_names_the_database_cannot_hold_are_refused_at_init(
    project: str, name: str, message: str, tmp_path
) -> None:
    with pytest.raises(InvalidInput, match=message):
        monitor.init(project, name, db=f"sqlite:///{tmp_path}/x.db", spool_dir=tmp_path)


def test_a_metric_beyond_the_float_range_is_refused_or_stored_rejected(
    db_url: str, tmp_path
) -> None:
    run = monitor.init("hostile", "huge-int", db=db_url, spool_dir=tmp_path / "spool")
    run.log_step(0, **_batch(0), metrics={"m": 1})
    with pytest.raises(InvalidInput, match=r"metrics\['m'\] is not storable as a float"):
        run.log_step(1, **_batch(1), metrics={"m": 10**400})
    with pytest.raises(InvalidInput, match=r"metrics\['m'\] is not storable as a float"):
        run.log_metrics(1, {"m": -(10**400)})
    run.log_step(1, **_batch(1), metrics={"m": 2})
    assert run.finish(timeout=30)
    steps, metrics, _ = _stored(db_url, "hostile", "huge-int")
    assert steps["step"].tolist() == [0, 1]
    assert metrics["m"].tolist() == [1.0, 2.0]

    lenient = monitor.init(
        "hostile", "huge-int-log", db=db_url, spool_dir=tmp_path / "spool", on_invalid="log"
    )
    lenient.log_step(0, **_batch(0), metrics={"m": 10**400, "ok": 1.0})
    lenient.log_step(1, **_batch(1))
    assert lenient.finish(timeout=30)
    steps, _, _ = _stored(db_url, "hostile", "huge-int-log")
    assert steps["status"].tolist() == ["rejected", "ok"]
    assert "metrics['m']" in steps["reject_reason"].iloc[0]


def _refuse_step(db_url: str, step: int) -> tuple[str, str]:
    """A trigger that makes the database itself refuse one step row: (create, drop) SQL."""
    if db_url.startswith("sqlite"):
        return (
            f"CREATE TRIGGER refuse_step BEFORE INSERT ON steps WHEN NEW.step = {step} "
            "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END",
            "DROP TRIGGER IF EXISTS refuse_step",
        )
    return (
        "CREATE OR REPLACE FUNCTION refuse_step() RETURNS trigger AS $$ BEGIN "
        f"IF NEW.step = {step} THEN RAISE EXCEPTION 'refused by a trigger'; END IF; "
        "RETURN NEW; END $$ LANGUAGE plpgsql; "
        "CREATE TRIGGER refuse_step BEFORE INSERT ON steps FOR EACH ROW "
        "EXECUTE FUNCTION refuse_step()",
        "DROP TRIGGER IF EXISTS refuse_step ON steps; DROP FUNCTION IF EXISTS refuse_step()",
    )


def _sql(url: str, statement: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if url.startswith("sqlite"):
                conn.exec_driver_sql(statement)
            else:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def test_a_record_the_database_refuses_is_dead_lettered_and_the_rest_written(
    db_url: str, tmp_path, caplog
) -> None:
    create, drop = _refuse_step(db_url, 3)
    _sql(db_url, create)
    try:
        caplog.set_level(logging.WARNING, logger="klmon")
        spool = tmp_path / "spool"
        run = monitor.init("hostile", "refused", db=db_url, spool_dir=spool, flush_interval=0.01)
        for step in range(7):
            run.log_step(step, **_batch(step))
        assert not run.flush(30), "a step the database refused is not in it: flush says so"
        assert run.stats["dead_letter"] == 1
        assert not run.finish(timeout=30)
    finally:
        _sql(db_url, drop)
    steps, _, _ = _stored(db_url, "hostile", "refused")
    assert steps["step"].tolist() == [0, 1, 2, 4, 5, 6]
    warnings = [r.getMessage() for r in caplog.records if "refused a record" in r.getMessage()]
    assert len(warnings) == 1 and "refused by a trigger" in warnings[0]
    (dead,) = spool.glob("*.klspool-dead")
    entries = [r.record for r in iter_records(dead) if isinstance(r, SpoolRecord)]
    assert [(e["record"]["step"], e["run"]["name"]) for e in entries] == [(3, "refused")]
    assert "refused by a trigger" in entries[0]["reason"]

    from click.testing import CliRunner

    from monitor.cli import main

    out = CliRunner().invoke(main, ["sync", "--spool-dir", str(spool), "--db", db_url])
    assert out.exit_code == 0, out.output
    assert f"{dead.name}: 1 records the database refused" in out.output, out.output


# --- property: any strings, names and values ---------------------------------------------------

_any_char = st.integers(0, 0x10FFFF).map(chr)  # surrogates and NUL included
_any_text = st.text(_any_char, max_size=40) | st.sampled_from(["\udcff", "\x00", "a\ud800b"])
_metric_value = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.integers(min_value=2**1023, max_value=2**1100),
    st.booleans(),
    st.text(max_size=3),
)
_step_input = st.fixed_dictionaries(
    {
        "prompts": st.lists(_any_text, min_size=2, max_size=2),
        "tokens": st.lists(_any_text, min_size=4, max_size=4),
        "metrics": st.dictionaries(st.text(_any_char, max_size=210), _metric_value, max_size=3),
    }
)


@pytest.mark.slow
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(inputs=st.lists(_step_input, min_size=1, max_size=4))
def test_any_log_step_input_is_stored_or_refused_and_the_next_step_arrives(
    db_url: str, tmp_path, inputs
) -> None:
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    run = monitor.init("hostile", name, db=db_url, spool_dir=tmp_path / name, flush_interval=0.01)
    accepted = []
    for step, inp in enumerate(inputs):
        try:
            run.log_step(
                step,
                **_batch(step, b=2, t=4),
                texts=(inp["prompts"], inp["prompts"][::-1]),
                tokens=[inp["tokens"], inp["tokens"]],
                metrics=inp["metrics"],
            )
        except InvalidInput as exc:
            assert "metric" in str(exc), exc  # refused at the call, naming the field
            continue
        accepted.append(step)
    run.log_step(len(inputs), **_batch(99, b=2, t=4))  # the step after them
    assert run.finish(timeout=30), run.stats
    db = Database.open(db_url)
    try:
        info = resolve_run(db, f"hostile/{name}")
        stored = read_steps(db, info.id)["step"].tolist()
    finally:
        db.dispose()
    assert stored == [*accepted, len(inputs)]


def _unencoded(sample: dict, *, prompt: str, token: str) -> dict:
    """A spooled sample in the form klmon wrote before payloads: arrays and strings."""
    d = decode_sample(sample["payload"])
    return {
        **{k: sample[k] for k in ("seq_index", "kind", "kl_seq", "reward")},
        "prompt": prompt,
        "response": d.response,
        "tokens": [token] * len(d.policy_logprobs),
        "policy_logprobs": d.policy_logprobs.astype(np.float32),
        "ref_logprobs": d.ref_logprobs.astype(np.float32),
    }


def test_sync_stores_a_spool_file_with_surrogates_and_nul_and_goes_on(
    db_url: str, tmp_path
) -> None:
    """A spool file written before the boundary cleaned text (or edited by hand), its
    samples in the form klmon spooled before payloads (arrays and strings): sync cleans and
    encodes them on the way in and replays every file."""
    from click.testing import CliRunner
    from support.db import down_url

    from monitor.cli import main
    from monitor.ingest.spool import encode_record, spool_files

    spool = tmp_path / "spool"
    for name in ("a-old", "b-next"):
        run = monitor.init("hostile", name, db=down_url(db_url, tmp_path), spool_dir=spool)
        for step in range(3):
            run.log_step(step, **_batch(step), texts=(["p"] * 3, ["r"] * 3))
        run.finish(timeout=0.2)
    old = next(p for p in spool_files(spool) if ".a-old." in p.name)
    rec = next(
        r.record
        for r in iter_records(old)
        if isinstance(r, SpoolRecord) and r.record.get("step") == 2
    )
    rec = {**rec, "step": 3, "hash": "old", "metrics": [["m\udcff\x00", 1.0]], "reason": "\udcff"}
    rec["samples"] = [_unencoded(s, prompt="\udcff\x00", token="t\udcff") for s in rec["samples"]]
    old.write_bytes(old.read_bytes() + encode_record(rec))

    out = CliRunner().invoke(main, ["sync", "--spool-dir", str(spool), "--db", db_url])
    assert out.exit_code == 0, out.output
    steps, metrics, info = _stored(db_url, "hostile", "a-old")
    assert steps["step"].tolist() == [0, 1, 2, 3]
    assert list(metrics.columns) == ["step", "m\ufffd"]
    db = Database.open(db_url)
    try:
        samples = read_samples(db, info.id, 3)
        assert {s.prompt for s in samples} == {"\ufffd"}
        assert {t for s in samples for t in s.tokens} == {"t\ufffd"}
        before = {s.seq_index: s for s in read_samples(db, info.id, 2)}
        for s in samples:
            assert s.policy_logprobs == before[s.seq_index].policy_logprobs
            assert s.ref_logprobs == before[s.seq_index].ref_logprobs
    finally:
        db.dispose()
    assert _stored(db_url, "hostile", "b-next")[0]["step"].tolist() == [0, 1, 2]
