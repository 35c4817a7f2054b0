"""The schema creates itself on an empty database (a new SQLite file, an empty PostgreSQL
database) for the commands that write: monitor.init, klmon import, klmon serve. A database at
an older revision is never migrated by a client: the error names `klmon db upgrade` and the
steps wait in the spool until it is run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import monitor
from monitor.cli import main
from monitor.errors import SchemaOutOfDate
from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.runs import find_run_by_name
from monitor.store.schema import current_revision, head_revision, upgrade
from monitor.store.steps import read_steps


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (4, 6))
    return {"policy_logprobs": lp, "ref_logprobs": np.minimum(lp + rng.normal(0, 0.1, lp.shape), 0)}


def _steps(url: str, name: str) -> list[int]:
    db = Database.open(url)
    try:
        info = find_run_by_name(db, "proj", name)
        return [] if info is None else read_steps(db, info.id)["step"].tolist()
    finally:
        db.dispose()


def test_init_creates_the_schema_on_an_empty_database(empty_db_url: str, tmp_path) -> None:
    run = monitor.init(
        "proj", "fresh", db=empty_db_url, spool_dir=tmp_path / "sp", flush_interval=0.01
    )
    for step in range(3):
        run.log_step(step, **_batch(step))
    assert run.flush(20)
    assert run.finish()
    assert run.stats["written"] == 3 and run.stats["db_errors"] == 0
    engine = make_engine(empty_db_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()
    assert _steps(empty_db_url, "fresh") == [0, 1, 2]


def test_an_older_schema_is_never_migrated_by_a_client(empty_db_url: str, tmp_path) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine, "0001")
    run = monitor.init(
        "proj", "old", db=empty_db_url, spool_dir=tmp_path / "sp", flush_interval=0.01
    )
    for step in range(3):
        run.log_step(step, **_batch(step))
    assert not run.flush(1.0)
    assert run.stats["acknowledged"] == 3 and run.stats["written"] == 0
    assert "klmon db upgrade" in (run._writer.last_error or "")
    assert current_revision(engine) != head_revision(), "a client must not migrate"
    out = CliRunner().invoke(main, ["db", "upgrade", "--db", empty_db_url])
    assert out.exit_code == 0, out.output
    assert run.flush(20), "the spooled steps follow once the schema is upgraded"
    assert run.finish()
    engine.dispose()
    assert _steps(empty_db_url, "old") == [0, 1, 2]


def test_klmon_import_creates_the_schema(empty_db_url: str, tmp_path) -> None:
    log = tmp_path / "steps.jsonl"
    log.write_text("".join(json.dumps({"step": s, "kl": 0.01 * s}) + "\n" for s in range(5)))
    out = CliRunner().invoke(
        main, ["import", str(log), "--project", "proj", "--run", "imp", "--db", empty_db_url]
    )
    assert out.exit_code == 0, out.output
    assert _steps(empty_db_url, "imp") == [0, 1, 2, 3, 4]


def test_serve_creates_the_schema_but_reading_commands_do_not(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dash

    out = CliRunner().invoke(main, ["runs", "--db", empty_db_url])
    assert out.exit_code == 1 and "klmon db upgrade" in out.output
    served: list[dict] = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: served.append(kw))
    out = CliRunner().invoke(main, ["serve", "--db", empty_db_url, "--port", "8123"])
    assert out.exit_code == 0, out.output
    assert served and served[0]["port"] == 8123
    out = CliRunner().invoke(main, ["runs", "--json", "--db", empty_db_url])
    assert out.exit_code == 0 and json.loads(out.output) == []


def test_a_database_with_foreign_tables_is_not_touched(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE other_app (x INTEGER)")
    with pytest.raises(SchemaOutOfDate, match="klmon db upgrade"):
        Database.open(empty_db_url, create=True)
    assert current_revision(engine) is None
    engine.dispose()


def test_two_threads_creating_two_new_databases_at_once_each_get_their_own_schema(
    tmp_path,
) -> None:
    """Alembic runs scripts through module-level proxies: two upgrades on two threads of one
    process must not run each other's operations (one failed with "table steps already
    exists" while a writer thread created another database's schema)."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import inspect

    from monitor.store.tables import metadata

    urls = [f"sqlite:///{tmp_path}/db{i}.db" for i in range(8)]
    engines = [make_engine(url) for url in urls]
    with ThreadPoolExecutor(len(engines)) as pool:
        list(pool.map(upgrade, engines))
    for engine in engines:
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            assert set(metadata.tables) <= set(inspect(conn).get_table_names())
        engine.dispose()
