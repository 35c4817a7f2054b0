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
