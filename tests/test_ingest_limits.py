"""Values the database cannot hold are refused at the call, so they never poison a batch
and keep the valid steps around them out of the database."""

from __future__ import annotations

import numpy as np
import pytest

import monitor
from monitor.errors import InvalidInput
from monitor.store.database import Database
from monitor.store.runs import resolve_run
from monitor.store.steps import read_metrics, read_steps


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    lp = -rng.gamma(1.0, 1.0, (4, 6))
    return {"policy_logprobs": lp, "ref_logprobs": lp - rng.uniform(0, 0.5, (4, 6))}


def test_out_of_range_step_bad_metric_names_and_bad_config_are_refused(db_url, tmp_path) -> None:
    spool = tmp_path / "spool"
    with pytest.raises(InvalidInput, match="config must be JSON without NaN"):
        monitor.init("p", "nan-config", config={"lr": float("nan")}, db=db_url, spool_dir=spool)
    with pytest.raises(InvalidInput, match="config must be JSON"):
        monitor.init("p", "obj-config", config={"x": object()}, db=db_url, spool_dir=spool)

    run = monitor.init("p", "limits", db=db_url, spool_dir=spool)
    for step in range(3):
        run.log_step(step, **_batch(step), metrics={"lr": 1e-5})
    with pytest.raises(InvalidInput, match=r"step must be in \[0, 2\*\*63 - 1\]"):
        run.log_step(2**63, **_batch(9))
    with pytest.raises(InvalidInput, match="step must be in"):
        run.log_metrics(-1, {"lr": 1.0})
    with pytest.raises(InvalidInput, match="at most 200 characters"):
        run.log_step(3, **_batch(3), metrics={"x" * 201: 1.0})
    with pytest.raises(InvalidInput, match="metric name '' must be a non-empty string"):
        run.log_metrics(3, {"": 1.0})
    for step in range(3, 6):
        run.log_step(step, **_batch(step), metrics={"lr": 2e-5})
    assert run.finish(timeout=30)

    db = Database.open(db_url)
    stored = resolve_run(db, "p/limits")
    assert list(read_steps(db, stored.id)["step"]) == [0, 1, 2, 3, 4, 5]
    assert list(read_metrics(db, stored.id)["step"]) == [0, 1, 2, 3, 4, 5]
    db.dispose()


def test_sync_dead_letters_a_record_the_database_refuses_and_replays_the_rest(
    db_url: str, tmp_path
) -> None:
    from click.testing import CliRunner
    from support.db import down_url

    from monitor.cli import main
    from monitor.ingest.spool import SpoolRecord, encode_record, iter_records, spool_files

    spool = tmp_path / "spool"
    for name in ("good", "poisoned"):
        run = monitor.init("p", name, db=down_url("sqlite", tmp_path), spool_dir=spool)
        for step in range(3):
            run.log_step(step, **_batch(step))
        run.finish(timeout=0.2)
    poisoned = next(p for p in spool_files(spool) if ".poisoned." in p.name)
    record = next(
        r.record
        for r in iter_records(poisoned)
        if isinstance(r, SpoolRecord) and r.record.get("step") == 2
    )
    # A step the database cannot hold (written by an older client, or a damaged file).
    poisoned.write_bytes(poisoned.read_bytes() + encode_record({**record, "step": 2**63}))

    # ...followed by a good step of the same file, which must not pay for it.
    later = {**record, "step": 3, "hash": "later"}
    poisoned.write_bytes(poisoned.read_bytes() + encode_record(later))

    out = CliRunner().invoke(main, ["sync", "--spool-dir", str(spool), "--db", db_url])
    assert out.exit_code == 0, out.output
    assert "1 records refused by the database" in out.output, out.output
    db = Database.open(db_url)
    for name, steps in (("p/good", [0, 1, 2]), ("p/poisoned", [0, 1, 2, 3])):
        assert list(read_steps(db, resolve_run(db, name).id)["step"]) == steps
    db.dispose()
    dead = list(spool.glob("*.klspool-dead"))
    assert len(dead) == 1 and ".poisoned." in dead[0].name
    kept = [r.record for r in iter_records(dead[0]) if isinstance(r, SpoolRecord)]
    assert [(k["type"], k["record"]["step"], k["run"]["name"]) for k in kept] == [
        ("dead", 2**63, "poisoned")
    ]
    assert "out of range" in kept[0]["reason"] or "too large" in kept[0]["reason"], kept[0]
    assert not poisoned.exists(), "replayed: the refused record lives on in the dead-letter file"
