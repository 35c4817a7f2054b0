"""Per-token JSONL: klmon computes its own step summaries, histograms and samples from the
policy and reference log-probs of each sequence, as the live client would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.errors import InvalidInput
from monitor.ingest.importers import import_path, parse_map, prepare_path
from monitor.store.database import Database
from monitor.store.drilldown import read_histograms, read_samples
from monitor.store.step_writes import write_imported_ledgers
from monitor.store.steps import read_metrics, read_steps
from monitor.store.vocabulary import read_token_ledger

FIXTURES = Path(__file__).parent / "fixtures" / "import"
TOKENS = FIXTURES / "tokens.jsonl"


def test_token_log_is_summarised_by_step() -> None:
    _f, p = prepare_path(TOKENS)
    assert (p.fmt, p.producer) == ("tokens", "klmon")
    steps = {r["step"]: r for r in p.steps}
    assert sorted(steps) == [0, 1]
    # docs/ARCHITECTURE.md's example: 'Good' (p -0.8, q -1.5), 'day' (p -0.4, q -2.1) -> 2.4 nats;
    # the masked <pad> token (ref NaN) is dropped before subtracting.
    assert steps[0]["kl_mean"] == pytest.approx((2.4 + 0.1 + 0.5) / 3)
    assert steps[0]["kl_max"] == pytest.approx(2.4)
    assert steps[0]["n_sequences"] == 3 and steps[0]["n_tokens"] == 6
    assert steps[0]["reward_mean"] == pytest.approx((1.0 + 0.5 + 0.2) / 3)
    assert steps[0]["kl_coef"] == 0.05
    assert steps[1]["kl_mean"] == pytest.approx((4.4 + 0.5) / 2)
    reasons = [str(x) for x in p.problems]
    assert reasons[0] == "line 4: policy_logprobs has 2 tokens but ref_logprobs has 1"
    assert reasons[1].startswith("line 7: not valid JSON")
    assert {(s, n): v for s, n, v in p.metrics}[(0, "loss")] == pytest.approx(0.6)


def test_token_import_stores_histograms_and_samples_once(db: Database) -> None:
    report = import_path(db, TOKENS, name="tok")
    assert report.steps_inserted == 2
    steps = read_steps(db, report.run.id)
    assert list(steps["n_tokens"]) == [6, 4]
    hist_steps, counts = read_histograms(db, report.run.id)
    assert list(hist_steps) == [0, 1]
    assert counts.sum(axis=1).tolist() == [6, 4]
    samples = read_samples(db, report.run.id, 0)
    assert [s.kind for s in samples] == ["top", "top", "top"]
    top = samples[0]
    assert top.kl_seq == pytest.approx(2.4)
    assert (top.prompt, top.response, top.tokens) == ("Say hi", "Good day", ["Good", " day"])
    assert top.policy_logprobs == [-0.8, -0.4] and top.reward == 1.0
    masked = next(s for s in samples if s.prompt == "Count")
    assert masked.tokens == ["one", " two"]  # the masked token is not stored
    assert read_metrics(db, report.run.id).set_index("step").loc[0, "loss"] == pytest.approx(0.6)
    again = import_path(db, TOKENS, name="tok")
    assert (again.steps_inserted, again.samples_inserted, again.histograms_inserted) == (0, 0, 0)
    assert len(read_samples(db, report.run.id, 0)) == 3


def test_random_samples_beyond_the_top(tmp_path: Path) -> None:
    log = tmp_path / "many.jsonl"
    lines = [
        f'{{"step": 3, "policy_logprobs": [-0.{i}, -0.5], "ref_logprobs": [-1.0, -0.5]}}'
        for i in range(1, 10)
    ]
    log.write_text("\n".join(lines) + "\n")
    _f, p = prepare_path(log)
    kinds = [s["kind"] for s in p.samples[3]]
    assert kinds == ["top", "top", "top", "random", "random"]
    top = [s["seq_index"] for s in p.samples[3][:3]]
    assert top == [0, 1, 2]  # -0.1 vs -1.0 is the largest log-ratio
    _f, again = prepare_path(log)
    assert again.samples == p.samples  # deterministic: re-imports pick the same ones


def test_map_is_refused_for_token_logs() -> None:
    with pytest.raises(InvalidInput, match="--map applies to step tables"):
        prepare_path(TOKENS, mapping=parse_map(["loss=kl_mean"]))


def token_log(path: Path, lines: list[tuple[int, list[str], list[float], list[float]]]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"step": s, "tokens": t, "policy_logprobs": p, "ref_logprobs": q}) + "\n"
            for s, t, p, q in lines
        )
    )
    return path


def test_token_strings_fill_the_ledger_one_id_per_string(db: Database, tmp_path: Path) -> None:
    lines = [
        (0, ["help", "!", "help"], [-0.1, -0.5, -0.2], [-1.1, -0.4, -0.9]),
        (0, [" ok", "help"], [-0.3, -0.2], [-0.3, -0.6]),
        (1, ["!", "<|im_end|>"], [-0.1, -0.1], [-0.9, -0.2]),
    ]
    report = import_path(db, token_log(tmp_path / "a.jsonl", lines), name="tok")
    assert report.ledgers_inserted == 2
    run = report.run.id
    led = read_token_ledger(db, run, 0, 0, k=10)
    help_sum = (1.0 + 0.7) + 0.4
    assert led["token"].tolist() == ["help"]  # the only positive id of step 0
    assert (led["count"].iloc[0], led["lr_sum"].iloc[0]) == (3, pytest.approx(help_sum))
    assert led.attrs["n_tokens"] == 5
    neg = read_token_ledger(db, run, 0, 0, k=10, side="neg")
    assert neg["token"].tolist() == ["!"]
    steps = read_steps(db, run).set_index("step")
    assert steps.loc[0, "vocab_top_share"] == pytest.approx(1.0)
    whole = read_token_ledger(db, run, k=10)
    assert len(set(whole["token_id"])) == len(whole)  # one id per string
    # more imported steps of the run: known strings keep their id, new ones get new ids
    d = {"ids": [0, 1], "counts": [1, 1], "sums": [-0.4, 0.8], "n": 2, "pos": 0.8, "neg": -0.4}
    assert write_imported_ledgers(db, run, [(2, d)], ["!", "new"]) == 1
    both = read_token_ledger(db, run, k=10)
    ids = dict(zip(both["token"], both["token_id"], strict=True))
    neg_ids = read_token_ledger(db, run, 2, 2, side="neg")
    assert neg_ids["token_id"].tolist() == neg["token_id"].tolist()  # "!" kept its id
    assert ids["new"] > max(whole["token_id"])
    again = import_path(db, token_log(tmp_path / "a.jsonl", lines), name="tok")
    assert again.ledgers_inserted == 0  # a re-import changes nothing


def test_a_step_without_token_strings_has_no_ledger(db: Database, tmp_path: Path) -> None:
    log = tmp_path / "mixed.jsonl"
    log.write_text(
        '{"step": 0, "tokens": ["a"], "policy_logprobs": [-0.1], "ref_logprobs": [-0.5]}\n'
        '{"step": 0, "policy_logprobs": [-0.1], "ref_logprobs": [-0.5]}\n'
    )
    report = import_path(db, log, name="mixed")
    assert report.steps_inserted == 1 and report.ledgers_inserted == 0
    assert read_token_ledger(db, report.run.id).empty
