"""Per-token JSONL: klmon computes its own step summaries, histograms and samples from the
policy and reference log-probs of each sequence, as the live client would."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.errors import InvalidInput
from monitor.ingest.importers import import_path, parse_map, prepare_path
from monitor.store.database import Database
from monitor.store.drilldown import read_histograms, read_samples
from monitor.store.steps import read_metrics, read_steps

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
