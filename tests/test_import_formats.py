"""Importers without a database: format detection, each reader on its fixture, key meanings,
--map validation, malformed lines and lying extensions."""

from __future__ import annotations

import builtins
import shutil
from pathlib import Path

import pytest

from monitor.errors import InvalidInput
from monitor.ingest.importers import (
    default_run_name,
    detect_format,
    detect_producer,
    lookup,
    parse_map,
    prepare_path,
)

FIXTURES = Path(__file__).parent / "fixtures" / "import"


def _steps(prepared) -> dict[int, dict]:
    return {
        r["step"]: {k: v for k, v in r.items() if k not in ("step", "wall_time", "payload_hash")}
        for r in prepared.steps
    }


def _metrics(prepared) -> dict[tuple[int, str], float]:
    return {(s, n): v for s, n, v in prepared.metrics}


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("trl_ppo.trainer_state.json", "trainer_state"),
        ("dpo.trainer_state.json", "trainer_state"),
        ("steps.jsonl", "jsonl"),
        ("tokens.jsonl", "tokens"),
        ("steps.csv", "csv"),
        ("no_step.tsv", "csv"),
        ("wandb_grpo.csv", "csv"),
        ("verl_console.log", "verl"),
        ("verl_tracking.parquet", "parquet"),
    ],
)
def test_format_is_detected_from_content(name: str, fmt: str, tmp_path: Path) -> None:
    assert detect_format(FIXTURES / name) == fmt
    # the content decides, not the name: the same bytes without an extension
    bare = tmp_path / "log"
    shutil.copy(FIXTURES / name, bare)
    assert detect_format(bare) == fmt


def test_a_file_that_is_not_what_its_extension_says_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"junk\.json: the name says JSON .* binary data"):
        detect_format(FIXTURES / "junk.json")
    with pytest.raises(
        InvalidInput, match=r"csv_named\.jsonl: the name says JSON Lines but the file holds CSV"
    ):
        prepare_path(FIXTURES / "csv_named.jsonl")
    # --format overrides the check
    _file, prepared = prepare_path(FIXTURES / "csv_named.jsonl", fmt="csv")
    assert sorted(_steps(prepared)) == [0, 1]


def test_unreadable_files_get_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.write_text("")
    with pytest.raises(InvalidInput, match=r"empty\.log: cannot read nothing"):
        detect_format(empty)
    prose = tmp_path / "notes.txt"
    prose.write_text("just some words\nand more words\n")
    with pytest.raises(InvalidInput, match=r"notes\.txt: cannot read text .* expected one of"):
        detect_format(prose)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("step,kl\n1,2\n")
    with pytest.raises(InvalidInput, match=r"x\.parquet: the name says Parquet but .* CSV"):
        detect_format(not_parquet)
    broken = tmp_path / "trainer_state.json"
    broken.write_text('{\n  "log_history": [\n    {"step": 1,, }\n  ]\n}\n')
    with pytest.raises(InvalidInput, match=r"not valid JSON .* line 3"):
        prepare_path(broken)
    with pytest.raises(InvalidInput, match="no such file"):
        prepare_path(tmp_path / "missing.jsonl")
    forced = tmp_path / "forced.jsonl"
    forced.write_text("a,b\n1,2\n")
    with pytest.raises(InvalidInput, match=r"no steps could be read .* 2 lines skipped"):
        prepare_path(forced, fmt="jsonl")


def test_trl_ppo_trainer_state() -> None:
    _file, p = prepare_path(FIXTURES / "trl_ppo.trainer_state.json")
    assert (p.fmt, p.producer) == ("trainer_state", "trl-ppo")
    steps = _steps(p)
    assert sorted(steps) == [10, 20, 30]  # the train_runtime summary row is not a step
    assert steps[10] == {"kl_mean": 0.12, "reward_mean": 0.806, "entropy_mean": 1.9}
    # objective/entropy (per-sequence sum) fills entropy_mean only where the per-token
    # policy/entropy_avg is absent; here it is Infinity, i.e. missing
    assert "entropy_mean" not in steps[30]
    m = _metrics(p)
    assert m[(20, "eval/loss")] == 0.55  # eval rows kept as metrics with eval/ names
    assert m[(20, "eval/objective/scores")] == 1.1
    assert (20, "policy/approxkl_avg") not in m  # bare NaN is missing
    assert m[(10, "policy/approxkl_avg")] == 0.0021
    assert p.config["train_summary"]["train_runtime"] == 120.5
    assert p.config["trainer_state"]["train_batch_size"] == 4
    infos = {i.name: i for i in p.infos}
    assert (infos["objective/kl"].quantity, infos["objective/kl"].estimator) == ("kl_mean", "k1")
    assert infos["objective/kl"].scale == "seq-sum"
    assert infos["objective/entropy"].scale == "seq-sum"
    assert infos["policy/entropy_avg"].scale == "token-mean"
    approx = infos["policy/approxkl_avg"]
    assert approx.quantity is None and "NOT KL to the reference" in approx.description
    assert infos["eval/objective/scores"].quantity is None  # eval never fills a quantity
    assert all(i.source == "trl-ppo" for i in infos.values())


def test_dpo_keys_are_metrics_only() -> None:
    _file, p = prepare_path(FIXTURES / "dpo.trainer_state.json")
    assert p.producer == "trl-dpo"
    assert p.mapping == {}
    assert _metrics(p)[(2, "rewards/chosen")] == 0.2
    assert lookup("trl-dpo", "kl").quantity is None  # KTO's kl is not GRPO's k3


def test_jsonl_nan_malformed_lines_and_rows_of_other_kinds() -> None:
    _file, p = prepare_path(FIXTURES / "steps.jsonl")
    assert p.producer == "generic"
    steps = _steps(p)
    assert sorted(steps) == [0, 1, 2, 5]
    assert steps[2] == {}  # reward -Infinity: missing
    m = _metrics(p)
    assert (1, "kl") not in m and (1, "loss") not in m  # NaN / Infinity are missing
    assert m[(0, "actor/lr")] == 1e-6  # nested objects flattened
    assert m[(5, "done")] == 1.0
    assert (0, "kl") in m and "k3" not in steps[0]  # a generic "kl" is never guessed
    reasons = [str(x) for x in p.problems]
    assert reasons[0].startswith("line 5: not valid JSON")
    assert reasons[1].startswith("line 6: a JSON array")
    assert reasons[2].startswith("line 7: no 'global_step' value (a row of another kind")
    assert reasons[3].startswith("line 8: bad step")
    assert any("note" in n for n in p.notes)
    # stored as missing, but said: a log whose loss went NaN should not look merely sparse
    nan_note = [n for n in p.notes if n.startswith("NaN or infinite values stored as missing")]
    assert nan_note and "kl (1)" in nan_note[0] and "loss (1)" in nan_note[0], p.notes


def test_csv_quoted_commas_empty_cells_and_bad_rows() -> None:
    _file, p = prepare_path(FIXTURES / "steps.csv", mapping=parse_map(["kl_vs_ref=kl_mean"]))
    steps = _steps(p)
    assert sorted(steps) == [0, 1, 2, 4, 5]
    assert steps[1] == {"kl_mean": -0.5}  # empty reward cell: missing
    assert steps[4] == {"kl_mean": -2.0}  # "2,5" is text, not a number
    assert steps[5] == {"kl_mean": -2.5, "reward_mean": 3.0}
    m = _metrics(p)
    assert m[(5, "lr")] == 2e-6  # after a quoted field spanning two lines
    assert (2, "lr") not in m
    assert [str(x) for x in p.problems] == ["line 5: 2 fields where the header has 5"]
    info = {i.name: i for i in p.infos}["kl_vs_ref"]
    assert (info.quantity, info.estimator, info.scale) == ("kl_mean", "k1", "seq-sum")
    assert "--map kl_vs_ref=kl_mean" in info.description


def test_no_step_column_uses_row_index() -> None:
    _file, p = prepare_path(FIXTURES / "no_step.tsv")
    assert sorted(_steps(p)) == [0, 1, 2]
    assert _steps(p)[2] == {"reward_mean": 1.3}
    assert any("row order" in n for n in p.notes)


def test_wandb_export_with_train_prefix_is_grpo() -> None:
    _file, p = prepare_path(FIXTURES / "wandb_grpo.csv")
    assert p.producer == "trl-grpo"
    steps = _steps(p)
    assert sorted(steps) == [5, 10, 15]  # train/global_step wins over nothing; _step kept
    assert steps[15]["k3"] == 0.003 and steps[15]["resp_len_mean"] == 455.0
    assert p.steps[0]["wall_time"] == 1714550400.5  # _timestamp
    m = _metrics(p)
    assert m[(15, "eval/loss")] == 0.61
    assert m[(15, "train/completions/clipped_ratio")] == 0.5


def test_verl_console_log() -> None:
    _file, p = prepare_path(FIXTURES / "verl_console.log")
    assert (p.fmt, p.producer) == ("verl", "verl")
    steps = _steps(p)
    assert sorted(steps) == [1, 2, 4]
    assert steps[1] == {
        "k3": 0.0012,
        "kl_coef": 0.001,
        "entropy_mean": 1.23,  # np.float64(1.23)
        "reward_mean": 0.25,
        "resp_len_mean": 350.5,
    }
    assert steps[2]["k3"] == 0.0031  # after a tqdm carriage return and ANSI colours
    assert "k3" not in steps[4] and steps[4]["resp_len_mean"] == 310.25  # nan; Ray suffix
    m = _metrics(p)
    assert m[(1, "actor/ppo_kl")] == 0.0003
    assert m[(1, "val-core/openai/gsm8k/reward/mean@1")] == 0.31
    assert [str(x) for x in p.problems] == ["line 5: unreadable item 'broken item without colon'"]
    info = {i.name: i for i in p.infos}
    assert (info["actor/kl_loss"].quantity, info["actor/kl_loss"].estimator) == ("k3", "k3")
    assert info["actor/ppo_kl"].quantity is None


def test_parquet_step_table() -> None:
    _file, p = prepare_path(FIXTURES / "verl_tracking.parquet")
    assert p.producer == "verl"
    steps = _steps(p)
    assert steps[0] == {"k1": 0.01, "kl_coef": 0.001, "reward_mean": 0.1, "resp_len_mean": 100.0}
    assert "k1" not in steps[2] and "reward_mean" not in steps[3]
    assert any("run_note" in n for n in p.notes)


def test_parquet_decimal_columns_are_numbers(tmp_path: Path) -> None:
    """Spark and pandas write exact decimals as Parquet DECIMAL: their values (the step too,
    exactly, even past 2**53) are read as numbers, as the same rows in JSON Lines are."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from decimal import Decimal

    big = 2**60 + 1  # not exact as a float64
    table = pa.table(
        {
            "step": pa.array([Decimal(1), Decimal(2), Decimal(big)], pa.decimal128(20, 0)),
            "loss": pa.array([Decimal("0.5"), None, Decimal("0.125")], pa.decimal128(6, 3)),
            "reward": [1.0, 2.0, 3.0],
        }
    )
    pq.write_table(table, tmp_path / "spark.parquet")
    _f, p = prepare_path(tmp_path / "spark.parquet")
    assert [r["step"] for r in p.steps] == [1, 2, big]
    metrics = _metrics(p)
    assert metrics[(1, "loss")] == 0.5 and metrics[(big, "loss")] == 0.125
    assert (2, "loss") not in metrics and not p.problems and not p.notes
    # a step with a fraction is no step, however close to a whole float it rounds
    half = pa.array(
        [Decimal(3), Decimal("2.5"), Decimal(2**53) + Decimal("0.5")], pa.decimal128(20, 1)
    )
    pq.write_table(pa.table({"step": half, "reward": [1.0, 2.0, 3.0]}), tmp_path / "half.parquet")
    _f, p = prepare_path(tmp_path / "half.parquet")
    assert [r["step"] for r in p.steps] == [3]
    assert [x.reason for x in p.problems] == [
        "bad step: step 2.5 is not a whole number",
        f"bad step: step {2**53}.5 is not a whole number",
    ]


@pytest.mark.parametrize(
    ("cell", "reason"),
    [
        ('"2024-01-01"', "bad step: step '2024-01-01' is not a number"),
        ("NaN", "bad step: step nan is not finite"),
        ('" "', "bad step: the step is empty"),
        ('"+-5"', "bad step: step '+-5' is not a number"),
        ('"\u00b2"', "bad step: step '\u00b2' is not a number"),
    ],
)
def test_a_step_that_is_no_number_says_why(tmp_path: Path, cell: str, reason: str) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(f'{{"step": {cell}, "loss": 1.0}}\n{{"step": 2, "loss": 0.5}}\n')
    _f, p = prepare_path(log)
    assert [r["step"] for r in p.steps] == [2]
    (problem,) = p.problems
    assert problem.reason.startswith(reason)


def test_parquet_without_pyarrow_is_a_clear_error(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(
        InvalidInput, match=r"verl_tracking\.parquet: .*pip install 'klmon\[parquet"
    ):
        prepare_path(FIXTURES / "verl_tracking.parquet")


def test_map_is_validated() -> None:
    assert parse_map(["a=k3", "b=-", "c=none"]) == {"a": "k3", "b": None, "c": None}
    with pytest.raises(InvalidInput, match="'kl_man' is not a klmon quantity; use one of kl_mean"):
        parse_map(["x=kl_man"])
    with pytest.raises(InvalidInput, match="expected COLUMN=QUANTITY"):
        parse_map(["kl"])
    with pytest.raises(InvalidInput, match=r"has no column 'kl_vs_rf'; did you mean kl_vs_ref\?"):
        prepare_path(FIXTURES / "steps.csv", mapping=parse_map(["kl_vs_rf=kl_mean"]))


def test_map_overrides_and_removes_default_meanings() -> None:
    _f, p = prepare_path(FIXTURES / "wandb_grpo.csv", mapping=parse_map(["train/kl=-"]))
    assert "k3" not in p.mapping
    assert _metrics(p)[(15, "train/kl")] == 0.003  # still kept as a metric
    _f, p = prepare_path(
        FIXTURES / "trl_ppo.trainer_state.json", mapping={"objective/entropy": "entropy_mean"}
    )
    assert _steps(p)[10]["entropy_mean"] == 41.5  # the user's column beats the default one


def test_producer_detection_and_meanings() -> None:
    assert detect_producer({"kl", "reward", "completion_length"}) == "trl-grpo"
    assert detect_producer({"kl", "reward"}) == "generic"
    assert detect_producer({"objective/kl", "objective/scores"}) == "trl-ppo"
    assert detect_producer({"actor/kl_loss"}) == "verl"
    assert detect_producer({"actor/lr", "kl"}) == "generic"
    assert lookup("trl-grpo", "kl").quantity == "k3"
    assert lookup("trl-grpo", "train/kl").quantity == "k3"
    assert lookup("trl-grpo", "completions/clipped_ratio").quantity is None
    assert lookup("generic", "approx_kl").quantity is None
    assert lookup("trl-ppo", "policy/approxkl_avg").quantity is None
    assert lookup("verl", "critic/kl").estimator == "k1"
    assert lookup("generic", "reward").quantity == "reward_mean"
    assert lookup("generic", "rewards/mean").quantity == "reward_mean"
    assert lookup("verl", "critic/score/mean").quantity == "reward_mean"
    assert lookup("trl-grpo", "entropy").scale == "token-mean"
    assert lookup("trl-ppo", "objective/entropy").scale == "seq-sum"
    assert lookup("trl-grpo", "eval_kl").quantity is None


def test_default_run_names(tmp_path: Path) -> None:
    assert default_run_name("logs/ppo_run.jsonl") == "ppo_run"
    assert default_run_name("x/gemma.trainer_state.json") == "gemma"
    ckpt = tmp_path / "grpo-qwen" / "checkpoint-250"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    assert default_run_name(ckpt / "trainer_state.json") == "grpo-qwen"
    assert default_run_name(tmp_path / "grpo-qwen") == "grpo-qwen"


def test_progress_is_reported_and_overlong_names_are_not_stored(tmp_path: Path) -> None:
    log = tmp_path / "long.jsonl"
    long_name = "x" * 201
    log.write_text("".join(f'{{"step": {s}, "reward": {s}, "{long_name}": 1}}\n' for s in range(3)))
    seen: list[tuple[str, int, int]] = []
    _f, p = prepare_path(log, progress=lambda *a: seen.append(a))
    assert seen and seen[-1] == ("read", log.stat().st_size, log.stat().st_size)
    assert {n for _s, n, _v in p.metrics} == {"reward"}
    assert any("over 200 characters" in n for n in p.notes)


def test_detection_reads_whole_first_lines(tmp_path: Path) -> None:
    bad_first = tmp_path / "a.jsonl"
    bad_first.write_text('{"step": 0, "kl": \n{"step": 1, "kl": 0.5}\n')
    assert detect_format(bad_first) == "jsonl"
    config_first = tmp_path / "b.jsonl"
    n = 20_000  # one line far longer than the sniffed head
    config_first.write_text(
        '{"run": "x", "model": "qwen"}\n'
        f'{{"step": 1, "logprobs": {[-0.5] * n}, "ref_logprobs": {[-0.6] * n}}}\n'
    )
    assert config_first.stat().st_size > 64 * 1024
    assert detect_format(config_first) == "tokens"
    other = tmp_path / "config.json"
    other.write_text('{\n  "model": "qwen"\n}\n')
    with pytest.raises(InvalidInput, match="JSON document without log_history"):
        detect_format(other)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_clean_tables_read_column_wise_equal_the_row_reader(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The columnar fast path (``tables.build_frame``) and the row-by-row rules give the same
    steps (payload hashes included), metrics, notes and meanings."""
    import numpy as np
    import pandas as pd

    from monitor.ingest.importers import registry

    n = 300
    rng = np.random.default_rng(5)
    frame = pd.DataFrame(
        {
            "global_step": np.arange(n) * 3,
            "objective/kl": rng.normal(size=n),
            "objective/entropy": rng.normal(size=n),
            "loss": rng.normal(size=n),
            "timestamp": 1.7e9 + np.arange(n),
            "n_tok": rng.integers(1, 10**6, n).astype(float),
        }
    )
    frame.loc[5, "loss"] = np.nan  # a missing cell
    frame.loc[7, "objective/kl"] = np.inf  # stored as missing, said in the notes
    path = tmp_path / f"log{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False, na_rep="")
        if not np.isfinite(frame["objective/kl"]).all():
            path.write_text(path.read_text().replace("inf", "1e999"))
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    mapping = {"n_tok": "n_tokens"}
    built = []
    real = registry.build_frame
    monkeypatch.setattr(
        registry, "build_frame", lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    )
    _f, fast = prepare_path(path, mapping=mapping)
    assert built and all(b is not None for b in built)  # the columnar path was taken
    monkeypatch.setattr(registry, "build_frame", lambda *a, **k: None)
    _f, slow = prepare_path(path, mapping=mapping)
    assert len(fast.steps) == n and fast.steps == slow.steps
    assert sorted(fast.metrics) == sorted(slow.metrics)
    assert (fast.notes, fast.mapping, fast.kl_read) == (slow.notes, slow.mapping, slow.kl_read)
    assert fast.infos == slow.infos and fast.step_column == slow.step_column


@pytest.mark.parametrize(
    "lines",
    [
        ['{"step": 0, "kl": 0.5, "loss": 1}', '{"step": 1, "kl": null, "loss": 2}'],
        ['{"step": 0, "kl": 0.5}', '{"step": 1, "loss": 2}', '{"step": 2, "kl": "0.25"}'],
        ['{"step": 0, "kl": 0.5, "loss": "nan"}', '{"step": 1, "kl": 0.7, "loss": 3}'],
        ['{"step": 0, "loss": 1, "kl": [0.5]}', '{"step": 1, "loss": 2, "kl": [0.7]}'],
    ],
    ids=["null", "missing-keys", "numeric-text", "lists"],
)
def test_jsonl_column_wise_equals_the_row_reader(
    tmp_path: Path, lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nulls, missing keys, numbers as text and list cells read the same through the
    columnar JSONL path (or make it step aside) as through the line reader."""
    from monitor.ingest.importers import registry

    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _f, fast = prepare_path(path)
    monkeypatch.setattr(registry, "build_frame", lambda *a, **k: None)
    _f, slow = prepare_path(path)
    assert fast.steps == slow.steps and sorted(fast.metrics) == sorted(slow.metrics)
    assert (fast.notes, fast.mapping, fast.problems) == (slow.notes, slow.mapping, slow.problems)


def test_quantity_hashes_depend_on_the_values_present_only() -> None:
    """The columnar payload hash: a column order, an absent value and a -0.0 rounded to an
    integer change nothing; a value, its name and which values are present change it."""
    import numpy as np

    from monitor.ingest.importers.payload_hashes import quantity_hashes

    nan = np.nan
    cols = {"k3": np.array([0.5, 0.5, nan, 0.5]), "reward_mean": np.array([1.0, 2.0, 1.0, nan])}
    h = quantity_hashes(cols, 4)
    assert all(x.startswith("v2:") and len(x) == 35 for x in h) and len(set(h)) == 4
    assert quantity_hashes(dict(reversed(cols.items())), 4) == h
    assert quantity_hashes({**cols, "kl_std": np.full(4, nan)}, 4) == h
    assert quantity_hashes({"k3": cols["k3"][[0]], "reward_mean": np.ones(1)}, 1) == h[:1]
    assert quantity_hashes({"k1": cols["k3"], "reward_mean": cols["reward_mean"]}, 4) != h
    assert quantity_hashes({"k3": cols["k3"]}, 4)[3] == h[3]
    ints = quantity_hashes({"n_tokens": np.array([-0.2, 0.0, 3.4, 3.0])}, 4)
    assert ints[0] == ints[1] and ints[2] == ints[3]
    assert quantity_hashes({}, 2) == [quantity_hashes({"k3": np.full(2, nan)}, 2)[0]] * 2


def test_jsonl_read_by_pyarrow_equals_the_line_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A numeric JSONL file parsed by pyarrow gives the columns and missing-cell counts of
    the line-by-line parse; what pyarrow would read otherwise is left to that parse."""
    pytest.importorskip("pyarrow")
    import numpy as np

    from monitor.ingest.importers import jsonl

    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"step": 0, "kl": 0.5, "loss": 1}\n{"step": 1, "kl": null}\n\n'
        '{"step": 2, "loss": 2.5, "big": 9007199254740993}\n'
    )
    fast = jsonl.read_frame(path, lambda n: None)
    arrow = jsonl._arrow_columns
    monkeypatch.setattr(jsonl, "_arrow_columns", lambda data: None)
    slow = jsonl.read_frame(path, lambda n: None)
    assert fast is not None and slow is not None
    assert list(fast[0]) == list(slow[0]) == ["step", "kl", "loss", "big"]
    for name, column in fast[0].items():
        np.testing.assert_array_equal(column, slow[0][name])
    assert (
        fast[1]
        == slow[1]
        == {
            "step": 0,
            "kl": 2,
            "loss": 1,
            "big": 2,
        }
    )
    for line in ['{"a": "1.5"}', '{"a": true}', '{"a": NaN}', '{"a": [1]}', '{"a": 1, "a": 2}']:
        assert arrow(line.encode() + b"\n") is None
    # bare NaN or Infinity next to nulls, and an exponent past float64: the rules decide
    for lines in ['{"a": null}\n{"a": -Infinity}', '{"a": 1e999}\n{"a": null}']:
        assert arrow(lines.encode() + b"\n") is None
    kept = arrow(b'{"a": null}\n{"a": 2.5}\n')  # a null is no reason to leave pyarrow
    assert kept is not None and kept[1] == {"a": 1}


@pytest.mark.parametrize(
    "data",
    [b'\xbb{"a": 1}\n{"a": 2}\n', b'\xef\xbb{"a": 1}\n', b'{"a": 1}\n{"b\xff": 2}\n'],
    ids=["stray byte", "half a byte-order mark", "key not UTF-8"],
)
def test_jsonl_that_is_not_utf8_takes_the_line_reader(tmp_path: Path, data: bytes) -> None:
    """Bytes that are not UTF-8 never reach pyarrow's reader (which took a stray leading byte
    the line reader refuses, and failed on a key that is not UTF-8): the line reader reports
    the line and keeps the others."""
    from monitor.ingest.importers import jsonl

    path = tmp_path / "log.jsonl"
    path.write_bytes(data)
    assert jsonl.read_frame(path, lambda n: None) is None
    table = jsonl.read(path, lambda n: None)
    assert [p.reason for p in table.problems] and all(
        "not UTF-8" in p.reason for p in table.problems
    )
    assert len(table.records) == data.count(b"\n") - len(table.problems)
