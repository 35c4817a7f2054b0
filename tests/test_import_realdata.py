"""Real logs of public training runs (/work/shared/realdata, see its INDEX.md) import with the
right meanings. Third-party data: read from there, never copied; skipped where absent."""

from __future__ import annotations

from pathlib import Path

import pytest
from realdata_path import REALDATA

from monitor.ingest.importers import import_path, parse_map, prepare_path
from monitor.store.database import Database
from monitor.store.metric_info import read_metric_info
from monitor.store.steps import read_metrics, read_steps

pytestmark = pytest.mark.skipif(
    not (REALDATA / "INDEX.md").is_file(),
    reason=f"real training logs not found at {REALDATA} (set KLMON_REALDATA to their folder)",
)


def _file(name: str) -> Path:
    path = REALDATA / name
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def test_gemma3_grpo_fills_k3_from_kl(db: Database) -> None:
    report = import_path(db, _file("gemma3_grpo_abdo.trainer_state.json"), project="real")
    assert (report.format, report.producer, report.problems) == ("trainer_state", "trl-grpo", [])
    steps = read_steps(db, report.run.id).set_index("step")
    assert list(steps.index) == list(range(10, 251, 10))
    assert steps.loc[10, "k3"] == pytest.approx(6.508313208541949e-06)
    assert steps["k3"].idxmax() == 130 and steps.loc[130, "k3"] == pytest.approx(0.0687, abs=1e-4)
    assert steps["kl_mean"].isna().all()  # a token mean of k3 is not a per-sequence sum
    assert steps.loc[250, "resp_len_mean"] == 340.375
    assert steps.loc[250, "reward_mean"] == pytest.approx(1.5109375)
    metrics = read_metrics(db, report.run.id).set_index("step")
    assert metrics.loc[130, "kl"] == steps.loc[130, "k3"]  # the source key is kept too
    assert metrics.loc[250, "rewards/correctness_reward_func"] == 0.95
    info = read_metric_info(db, report.run.id)
    assert (info["kl"].quantity, info["kl"].estimator, info["kl"].scale) == (
        "k3",
        "k3",
        "token-mean",
    )
    assert info["kl"].source == "trl-grpo"
    assert report.run.config["trainer_state"]["logging_steps"] == 10
    again = import_path(db, _file("gemma3_grpo_abdo.trainer_state.json"), project="real")
    assert (again.steps_inserted, again.metrics_inserted, again.step_conflicts) == (0, 0, ())


def test_chaos_economy_grpo_keeps_clipped_ratio_as_metric() -> None:
    _f, p = prepare_path(_file("chaos_economy_grpo.trainer_state.json"))
    assert p.producer == "trl-grpo" and p.problems == []
    steps = {r["step"]: r for r in p.steps}
    assert sorted(steps) == list(range(5, 201, 5))
    assert steps[5]["k3"] == pytest.approx(7.837624616513495e-06)
    assert steps[200]["k3"] == pytest.approx(0.0473, abs=1e-3)
    assert p.mapping["resp_len_mean"] == ["completions/mean_length"]
    metrics = {(s, n): v for s, n, v in p.metrics}
    clipped = [metrics[(s, "completions/clipped_ratio")] for s in range(115, 201, 5)]
    assert clipped.count(1.0) >= len(clipped) / 2
    assert all("clipped" not in q for q in p.mapping)
    info = {i.name: i for i in p.infos}
    assert info["completions/clipped_ratio"].quantity is None
    assert info["clip_ratio/region_mean"].quantity is None
    assert "NOT KL to the reference" in info["clip_ratio/region_mean"].description


def test_trl_detox_approx_kl_is_objective_kl_via_map(db: Database) -> None:
    path = _file("ppo_detox_trl_baseline_zongyang.jsonl")
    # by default approx_kl means old-vs-new policy: kept as a metric, never a KL to the ref
    _f, default = prepare_path(path)
    assert "kl_mean" not in default.mapping
    assert "old-vs-new" in {i.name: i for i in default.infos}["approx_kl"].description
    # INDEX.md: here it is TRL's objective/kl, a per-sequence sum -> kl_mean
    report = import_path(db, path, mapping=parse_map(["approx_kl=kl_mean"]))
    steps = read_steps(db, report.run.id).set_index("step")
    assert list(steps.index) == list(range(200))
    assert steps.loc[0, "kl_mean"] == pytest.approx(31.672718048095703)
    assert 5 < steps.loc[190:, "kl_mean"].mean() < 15  # decays to ~10
    assert steps.loc[0, "reward_mean"] == pytest.approx(2.2603259086608887)
    info = read_metric_info(db, report.run.id)["approx_kl"]
    assert (info.quantity, info.estimator, info.scale) == ("kl_mean", "k1", "seq-sum")
    metrics = read_metrics(db, report.run.id).set_index("step")
    assert set(metrics.columns) >= {"approx_kl", "clip_fraction", "policy_loss", "value_loss"}


def test_manual_ppo_negative_kl_vs_ref() -> None:
    path = _file("ppo_detox_manual_zongyang.jsonl")
    _f, p = prepare_path(path, mapping=parse_map(["kl_vs_ref=kl_mean"]))
    kl = [r["kl_mean"] for r in p.steps]
    assert len(kl) == 200
    assert sum(v < 0 for v in kl) == 199
    assert kl[0] == 0.0 and kl[-1] < -5
    metrics = {(s, n): v for s, n, v in p.metrics}
    assert all(metrics[(s, "approx_kl")] == 0.0 for s in range(200))  # kept, never mapped
