"""Imports that skip what they cannot read and never leave half a run: bad lines listed with
their line numbers, step columns, one source per run, cleanup after a failure midway, Parquet
in batches (SQLite and PostgreSQL where a database is involved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.errors import InvalidInput, StoreError
from monitor.ingest.importers import (
    detect_format,
    detect_producer,
    import_path,
    lookup,
    parse_map,
    prepare_path,
)
from monitor.ingest.importers import importer as importer_module
from monitor.ingest.importers import parquet as parquet_module
from monitor.ingest.importers.base import MAX_DEPTH
from monitor.store.database import Database
from monitor.store.drilldown import read_samples
from monitor.store.runs import find_run_by_name
from monitor.store.steps import read_metrics, read_steps


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _problems(prepared) -> dict[int | None, str]:
    return {p.line: p.reason for p in prepared.problems}


def _nested(depth: int) -> dict:
    obj: dict = {"v": 1.0}
    for _ in range(depth):
        obj = {"n": obj}
    return obj


def test_jsonl_bad_lines_are_skipped_and_listed(tmp_path: Path) -> None:
    log = _write(
        tmp_path / "run.jsonl",
        [
            b'{"step": 1, "reward": 1.0}',
            b'{"step": 9223372036854775808, "reward": 2.0}',  # 2**63
            b'{"step": 1e300, "reward": 3.0}',
            b'{"step": 4, "reward": 4.0, "note": "a\x00b"}',
            b'{"step": 5, "reward": "\xff\xfe"}',
            b"[" * 100_000,
            json.dumps({"step": 7, **_nested(MAX_DEPTH + 2)}).encode(),
            b'{"step": 8, "reward": 8.0, "big": ' + b"9" * 400 + b"}",
            b'{"step": 9223372036854775807, "reward": 9.0}',  # the largest step there is
        ],
    )
    _f, p = prepare_path(log)
    steps = {r["step"]: r.get("reward_mean") for r in p.steps}
    assert steps == {1: 1.0, 8: 8.0, 2**63 - 1: 9.0}
    problems = _problems(p)
    assert sorted(problems) == [2, 3, 4, 5, 6, 7]
    assert "out of range" in problems[2] and "out of range" in problems[3]
    assert "NUL byte" in problems[4]
    assert "not UTF-8" in problems[5]
    assert "nested too deeply" in problems[6]
    assert f"deeper than {MAX_DEPTH}" in problems[7]
    # a 400-digit integer is beyond a float: stored as missing and said so
    assert (8, "big") not in {(s, n) for s, n, _v in p.metrics}
    assert any("big (1)" in n for n in p.notes)


def test_a_file_is_refused_only_when_nothing_is_readable(db: Database, tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.jsonl", [b'{"step": 1e300}', b"\x00\x01", b"{"])
    with pytest.raises(InvalidInput, match=r"no steps could be read .* 3 lines skipped"):
        import_path(db, bad)
    assert find_run_by_name(db, "imported", "bad") is None


def test_a_text_log_with_a_few_binary_lines_is_not_binary(tmp_path: Path) -> None:
    log = _write(
        tmp_path / "run.jsonl",
        [b"\x00\x00\x00", b'{"step": 1, "reward": 1.0}', b'{"step": 2, "reward": 2.0}'],
    )
    assert detect_format(log) == "jsonl"
    assert [r["step"] for r in prepare_path(log)[1].steps] == [1, 2]


def test_csv_bad_lines_are_skipped_with_their_numbers(tmp_path: Path) -> None:
    log = _write(
        tmp_path / "run.csv",
        [
            b"step,reward,kl",
            b"1,1.0,0.1",
            b"2,\x00,0.2",
            b"3,\xff,0.3",
            b"9223372036854775808,4.0,0.4",
            b"5,5.0",
            b"6,6.0,0.6",
        ],
    )
    _f, p = prepare_path(log)
    assert [r["step"] for r in p.steps] == [1, 6]
    problems = _problems(p)
    assert sorted(problems) == [3, 4, 5, 6]
    assert "NUL" in problems[3] and "not UTF-8" in problems[4]
    assert "out of range" in problems[5] and "2 fields" in problems[6]


def test_console_log_bad_dict_and_binary_lines(tmp_path: Path) -> None:
    log = _write(
        tmp_path / "train.log",
        [
            b"***** Running training *****",
            b"{'loss': 0.5, 'kl': 0.01, 'completion_length': 90.0, 'epoch': 0.1}",
            b"{'loss': 0.4, 'kl': , 'epoch': 0.2}",
            b"{'loss': 0.3, 'kl': nan, 'reward': np.float64(1.5), 'epoch': 0.3}\x00",
            b"  5%|5 | 10/200 [00:10<03:10]\r{'loss': 0.2, 'kl': tensor(0.02), 'epoch': 0.4}",
            b"Updated tokens: {'eos_token_id': 1, 'pad_token_id': 2}",
            b"{'eval_loss': 0.9, 'epoch': 0.4}",
            b"{'loss': '0.1', 'kl': inf, 'reward': '2', 'epoch': '0.5'}",
            b"{'train_runtime': '60', 'train_loss': '0.3', 'epoch': '0.5'}",
        ],
    )
    assert detect_format(log) == "hf_console"
    _f, p = prepare_path(log)
    steps = {r["step"]: r for r in p.steps}
    assert sorted(steps) == [1, 2, 3]
    assert steps[1]["k3"] == 0.01 and steps[2]["k3"] == 0.02
    assert "k3" not in steps[3] and steps[3]["reward_mean"] == 2.0  # inf: missing
    problems = _problems(p)
    assert sorted(problems) == [3, 4]
    assert "not a readable dict" in problems[3] and "NUL" in problems[4]
    metrics = {(s, n): v for s, n, v in p.metrics}
    assert metrics[(2, "eval/loss")] == 0.9  # joins the training dict before it
    assert p.config["train_summary"]["train_runtime"] == "60"


@pytest.mark.parametrize(
    ("header", "step_column", "how"),
    [
        ("update", None, "detected"),
        ("trainer/global_step", None, "detected"),
        ("iter", None, "detected"),
        ("it", "it", "--step-column"),
    ],
)
def test_step_column(tmp_path: Path, header: str, step_column: str | None, how: str) -> None:
    log = tmp_path / "run.csv"
    log.write_text(f"{header},kl,reward\n10,0.1,1\n20,0.2,2\n")
    _f, p = prepare_path(log, step_column=step_column, mapping=parse_map(["kl=k3"]))
    assert [r["step"] for r in p.steps] == [10, 20]
    assert (p.step_column, p.step_source) == (header, how)


def test_map_column_to_step_and_conflicting_step_options(db: Database, tmp_path: Path) -> None:
    log = tmp_path / "run.csv"
    log.write_text("it,other,reward\n3,7,1\n4,8,2\n")
    report = import_path(db, log, mapping=parse_map(["it=step"]))
    assert list(read_steps(db, report.run.id)["step"]) == [3, 4]
    assert "step from column it (--map it=step)" in report.summary_lines()
    assert "it" not in read_metrics(db, report.run.id).columns
    with pytest.raises(InvalidInput, match="one step column only"):
        prepare_path(log, mapping=parse_map(["it=step"]), step_column="other")
    with pytest.raises(InvalidInput, match="has no column 'nope'"):
        prepare_path(log, step_column="nope")


def test_epoch_is_a_step_only_as_a_last_resort(tmp_path: Path) -> None:
    whole = tmp_path / "whole.csv"
    whole.write_text("epoch,reward\n1,1\n2,2\n")
    _f, p = prepare_path(whole)
    assert (p.step_column, [r["step"] for r in p.steps]) == ("epoch", [1, 2])
    assert "last resort" in p.step_source
    fractional = tmp_path / "frac.csv"
    fractional.write_text("epoch,reward\n0.5,1\n1.0,2\n")
    _f, p = prepare_path(fractional)
    assert (p.step_column, [r["step"] for r in p.steps]) == (None, [0, 1])
    both = tmp_path / "both.csv"
    both.write_text("epoch,step,reward\n1,5,1\n2,6,2\n")
    assert prepare_path(both)[1].step_column == "step"


def test_more_producers_and_keys() -> None:
    tinker = ["optim/kl_sample_train_v1", "optim/entropy", "env/all/reward/total", "step"]
    assert detect_producer(tinker) == "tinker"
    assert lookup("tinker", "optim/kl_sample_train_v1").quantity == "rollout_gap"
    assert lookup("tinker", "optim/entropy").quantity == "policy_nll"
    assert lookup("tinker", "env/all/reward/total").quantity == "reward_mean"
    openrlhf = ["train/kl", "train/reward", "train/actor_lr", "train/policy_loss"]
    assert detect_producer(openrlhf) == "openrlhf"
    assert (lookup("openrlhf", "train/kl").quantity, lookup("openrlhf", "train/kl").scale) == (
        "k1",
        "seq-mean",
    )
    assert lookup("trl-rloo", "kl").estimator == "k1"
    assert lookup("trl-grpo", "kl").estimator == "k3"
    for key, quantity in (
        ("completion_length_mean", "resp_len_mean"),
        ("policy_entropy_mean", "entropy_mean"),
    ):
        assert lookup("generic", key).quantity == quantity
        assert lookup("trl-grpo", key).quantity == quantity


def test_tinker_log_says_its_kl_is_a_rollout_gap(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    rows = [
        {"step": s, "optim/kl_sample_train_v1": 0.001 * s, "optim/kl_sample_train_v2": 0.0,
         "env/all/reward/total": 0.5}
        for s in range(3)
    ]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _f, p = prepare_path(log)
    assert p.producer == "tinker" and p.kl_read == [] and p.kl_candidates == []
    assert [r["rollout_gap"] for r in p.steps] == [0.0, 0.001, 0.002]
    (line,) = p.kl_lines()
    assert "optim/kl_sample_train_v1 read as rollout_gap" in line


def _parquet(path: Path, n: int, *, with_step: bool = True) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cols = {"kl": [0.001 * (i % 7) for i in range(n)], "reward": [float(i) for i in range(n)]}
    if with_step:
        cols = {"step": list(range(n)), **cols}
    pq.write_table(pa.table(cols), path, row_group_size=max(1, n // 3))
    return path


def test_parquet_is_read_in_batches(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parquet_module, "BATCH_CELLS", 300)  # 100 rows of 3 columns a batch
    path = _parquet(tmp_path / "big.parquet", 1_050)
    report = import_path(db, path, mapping=parse_map(["kl=k3"]))
    steps = read_steps(db, report.run.id)
    assert list(steps["step"]) == list(range(1_050))
    assert steps["reward_mean"].tolist() == [float(i) for i in range(1_050)]
    assert report.steps_read == 1_050 and report.kl_read == [("kl", "k3", "k3", "nats/token")]
    # without a step column the row order continues from batch to batch
    bare = _parquet(tmp_path / "bare.parquet", 250, with_step=False)
    _f, p = prepare_path(bare)
    assert [r["step"] for r in p.steps] == list(range(250))


def test_an_import_failing_midway_leaves_nothing(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parquet_module, "BATCH_CELLS", 300)
    path = _parquet(tmp_path / "fails.parquet", 1_000)
    real = importer_module.write_metric_columns  # a numeric Parquet file is read column-wise
    calls = {"n": 0}

    def failing(db_: Database, run_id: int, columns: dict) -> object:
        calls["n"] += 1
        if calls["n"] == 3:  # steps and metrics of a batch are in by now
            raise StoreError("database: injected failure")
        return real(db_, run_id, columns)

    monkeypatch.setattr(importer_module, "write_metric_columns", failing)
    with pytest.raises(StoreError, match="injected"):
        import_path(db, path)
    assert find_run_by_name(db, "imported", "fails") is None
    with db.begin() as conn:
        from sqlalchemy import text

        left = conn.execute(text("SELECT count(*) FROM steps")).scalar_one()
    assert left == 0
    # the same file imports whole afterwards
    monkeypatch.setattr(importer_module, "write_metric_columns", real)
    report = import_path(db, path)
    assert report.created and report.steps_inserted == 1_000


def test_odd_text_in_samples_and_names_never_fails_an_import(db: Database, tmp_path: Path) -> None:
    """A NUL byte or a lone surrogate in a prompt or a column name (PostgreSQL refuses both)."""
    log = tmp_path / "tokens.jsonl"
    lines = [
        {"step": s, "policy_logprobs": [-0.5, -1.0], "ref_logprobs": [-0.6, -1.2],
         "prompt": "a\u0000b\udcff", "response": "ok", "tokens": ["x\u0000", "y"]}
        for s in range(3)
    ]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = import_path(db, log)
    assert report.steps_inserted == 3 and report.samples_inserted > 0
    sample = read_samples(db, report.run.id, 0)[0]
    assert sample.prompt == "ab\ufffd" and sample.tokens == ["x", "y"]
    table = tmp_path / "names.jsonl"
    table.write_text('{"step": 1, "re\\u0000ward\\udcff": 1.0}\n')
    named = import_path(db, table)
    assert list(read_metrics(db, named.run.id).columns) == ["step", "reward\ufffd"]


def test_extreme_but_valid_values_are_stored(db: Database, tmp_path: Path) -> None:
    log = _write(
        tmp_path / "extreme.jsonl",
        [
            b'{"step": 0, "kl": 1e300, "reward": -1e300, "n_tokens": 1e300}',
            b'{"step": 9223372036854775807, "kl": 5e-324, "reward": 1.0}',
            b'{"step": 1e300, "reward": 2.0}',
        ],
    )
    report = import_path(db, log, mapping=parse_map(["kl=k3"]))
    assert [p.line for p in report.problems] == [3]
    steps = read_steps(db, report.run.id).set_index("step")
    assert list(steps.index) == [0, 2**63 - 1]
    assert steps.loc[0, "k3"] == 1e300 and steps.loc[0, "reward_mean"] == -1e300
    assert steps["n_tokens"].isna().all()  # beyond the integer column: a metric only
    assert read_metrics(db, report.run.id).set_index("step").loc[0, "n_tokens"] == 1e300
