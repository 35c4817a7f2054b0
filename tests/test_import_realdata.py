"""Real logs of public training runs (/work/shared/realdata, see its INDEX.md) import with the
right meanings. Third-party data: read from there, never copied; skipped where absent."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.realdata_path import REALDATA

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


# file, --map, format, producer, steps, the KL quantity, its column, estimator, unit
EXPECTED = [
    ("gemma3_grpo_abdo.trainer_state.json", [], "trainer_state", "trl-grpo",
     list(range(10, 251, 10)), "k3", "kl", "k3", "nats/token"),
    ("chaos_economy_grpo.trainer_state.json", [], "trainer_state", "trl-grpo",
     list(range(5, 201, 5)), "k3", "kl", "k3", "nats/token"),
    ("ppo_detox_trl_baseline_zongyang.jsonl", ["approx_kl=kl_mean"], "jsonl", "generic",
     list(range(200)), "kl_mean", "approx_kl", "k1", "nats/sequence"),
    ("ppo_detox_manual_zongyang.jsonl", ["kl_vs_ref=kl_mean"], "jsonl", "generic",
     list(range(200)), "kl_mean", "kl_vs_ref", "k1", "nats/sequence"),
    ("trl_grpo_console_seed44_sunshine.log", [], "hf_console", "trl-grpo",
     list(range(1, 201)), "k3", "kl", "k3", "nats/token"),
    ("trl_grpo_console_adq_seed45_sunshine.log", [], "hf_console", "trl-grpo",
     list(range(1, 201)), "k3", "kl", "k3", "nats/token"),
    ("trl_ppo_v1_kartikmunjal.trajectory.json", [], "jsonl", "trl-ppo",
     list(range(1, 101)), "kl_mean", "objective/kl", "k1", "nats/sequence"),
    ("trl_ppo_v2_kartikmunjal.trajectory.json", [], "jsonl", "trl-ppo",
     list(range(1, 101)), "kl_mean", "objective/kl", "k1", "nats/sequence"),
    ("custom_ppo_dead_run_rlhfkit.train.jsonl", [], "jsonl", "generic",
     list(range(1, 51)), "kl_mean", "kl_mean", "k1", "nats/sequence"),
]  # fmt: skip


@pytest.mark.parametrize("row", EXPECTED, ids=[r[0].split(".")[0] for r in EXPECTED])
def test_every_real_log_imports_with_its_steps_and_kl(db: Database, row: tuple) -> None:
    name, maps, fmt, producer, steps, quantity, column, estimator, unit = row
    report = import_path(db, _file(name), project="every", mapping=parse_map(maps))
    assert (report.format, report.producer, report.problems) == (fmt, producer, [])
    stored = read_steps(db, report.run.id)
    assert list(stored["step"]) == steps
    assert stored[quantity].notna().sum() >= len(steps) - 1  # kl is logged on (nearly) every row
    assert (column, quantity, estimator, unit) in report.kl_read
    assert f"KL read from: {column} -> {quantity} ({estimator}, {unit})" in "\n".join(
        report.summary_lines()
    )
    # what the run config records for readers of the run (runs list, dashboard)
    kl = report.run.config["import"]["kl"][0]
    assert (kl["column"], kl["quantity"], kl["unit"]) == (column, quantity, unit)
    assert report.run.status == "finished"


@pytest.mark.parametrize(
    ("name", "candidates"),
    [
        ("ppo_detox_trl_baseline_zongyang.jsonl", "approx_kl"),
        ("ppo_detox_manual_zongyang.jsonl", "approx_kl, kl_vs_ref"),
    ],
)
def test_a_log_whose_kl_is_not_recognised_says_so_and_names_the_map(
    name: str, candidates: str
) -> None:
    _f, p = prepare_path(_file(name))
    assert p.kl_read == [] and ", ".join(p.kl_candidates) == candidates
    (line,) = p.kl_lines()
    assert line.startswith("no KL column recognised, so no KL monitoring for this run")
    assert f"named like KL: {candidates}" in line
    assert "--map approx_kl=kl_mean" in line


def test_console_log_reads_the_printed_dicts_in_order(db: Database) -> None:
    path = _file("trl_grpo_console_adq_seed45_sunshine.log")
    report = import_path(db, path, project="console")
    steps = read_steps(db, report.run.id).set_index("step")
    # INDEX.md: a KL spike to 0.92 at HF step 160
    assert steps["k3"].idxmax() == 160 and steps.loc[160, "k3"] == pytest.approx(0.9205)
    assert steps.loc[1, "k3"] == 0.0  # printed as the string '0'
    assert steps.loc[1, "resp_len_mean"] == pytest.approx(253.2)
    metrics = read_metrics(db, report.run.id).set_index("step")
    assert {"loss", "grad_norm", "learning_rate", "epoch", "rewards/reward_fn"} <= set(
        metrics.columns
    )
    assert report.run.config["train_summary"]["train_runtime"] == "7098"
    lines = report.summary_lines()
    assert "step from the order of the Trainer's printed dicts" in lines
    assert any("Total optimization steps = 200" in line for line in lines)
    seed44 = prepare_path(_file("trl_grpo_console_seed44_sunshine.log"))[1]
    k3 = {r["step"]: r["k3"] for r in seed44.steps}
    assert max(k3.values()) == pytest.approx(0.3347) and len(k3) == 200


def test_two_checkpoint_folders_with_the_default_name_never_merge(
    db: Database, tmp_path: Path
) -> None:
    """The issue's case: two different outputs/checkpoint-250/ imported with the default name."""
    a = tmp_path / "a" / "outputs" / "checkpoint-250"
    b = tmp_path / "b" / "outputs" / "checkpoint-250"
    for folder, src in (
        (a, "gemma3_grpo_abdo.trainer_state.json"),
        (b, "chaos_economy_grpo.trainer_state.json"),
    ):
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_bytes(_file(src).read_bytes())
    first = import_path(db, a)
    second = import_path(db, b)
    assert first.run.name == "outputs" and second.run.name.startswith("outputs-")
    assert second.renamed_from == "outputs" and second.created
    assert (second.step_conflicts, second.metric_conflicts) == ((), [])
    assert list(read_steps(db, first.run.id)["step"]) == list(range(10, 251, 10))
    assert list(read_steps(db, second.run.id)["step"]) == list(range(5, 201, 5))
    # each again: a no-op in its own run
    for folder, report in ((a, first), (b, second)):
        again = import_path(db, folder)
        assert (again.run.id, again.steps_inserted, again.metrics_inserted) == (
            report.run.id,
            0,
            0,
        )
