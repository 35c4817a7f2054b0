"""Real TRL training on CPU with ``monitor.integrations.trl.watch``: GRPOTrainer and
RLOOTrainer on a tiny offline model, with gradient accumulation, beta = 0 and beta > 0,
mask_truncated_completions, and a reward that is easy to hack.

Needs the ``trl`` extra (torch, transformers, trl): ``pip install ".[test,trl]"`` and
``pytest -m trl``. Without it these tests skip, unless KLMON_REQUIRE_TRL=1 (the CI's TRL
venv) makes a missing dependency an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support.trl_tiny import build, sentences

from monitor.cli import main as cli
from monitor.integrations.trl import watch
from monitor.store.database import Database
from monitor.store.drilldown import read_samples
from monitor.store.steps import read_metrics, read_steps
from monitor.store.vocabulary import read_token_ledger

pytestmark = pytest.mark.trl

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl
except ImportError as exc:  # pragma: no cover - depends on the venv
    if os.environ.get("KLMON_REQUIRE_TRL") == "1":
        raise
    pytest.skip(
        f"the TRL suite needs the trl extra (pip install '.[test,trl]'): {exc}",
        allow_module_level=True,
    )


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def happy_reward(completions: list[str], **kwargs) -> list[float]:
    """Easy to hack: every 'happy' pays, whatever the sentence says."""
    return [float(c.count("happy")) for c in completions]


def length_reward(completions: list[str], **kwargs) -> list[float]:
    return [len(c) / 20.0 for c in completions]


def train(kind: str, tiny: Path, tmp_path: Path, db: str, steps: int, **overrides):
    from datasets import Dataset

    config_cls = trl.GRPOConfig if kind == "grpo" else trl.RLOOConfig
    trainer_cls = trl.GRPOTrainer if kind == "grpo" else trl.RLOOTrainer
    settings = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": steps,
        "logging_steps": 1,
        "learning_rate": 3e-3,
        "beta": 0.04,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
        **overrides,
    }
    trainer = trainer_cls(
        model=str(tiny),
        args=config_cls(**settings),
        reward_funcs=[happy_reward, length_reward],
        train_dataset=Dataset.from_dict({"prompt": sentences(64, seed=1)}),
    )
    run = watch(trainer, project="trl", name=f"{kind}-{steps}", db=db, spool_dir=tmp_path / "sp")
    trainer.train()  # klmon must never make this fail
    assert run.status == "finished"
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    return run, trainer, logged


def stored(db_url: str, run_id: int):
    db = Database.open(db_url)
    try:
        return db, read_steps(db, run_id).set_index("step"), read_metrics(db, run_id)
    except Exception:
        db.dispose()
        raise


def assert_ledger_named_by_tokenizer(db: Database, run_id: int, steps, trainer) -> None:
    """watch passed the completion ids and the trainer's tokenizer: every step has a ledger
    over all its tokens, and the stored texts are the tokenizer's."""
    ledger = read_token_ledger(db, run_id, k=10)
    assert ledger.attrs["n_steps"] == len(steps)
    assert ledger.attrs["n_tokens"] == int(steps["n_tokens"].sum())
    assert steps["vocab_top_share"].between(0, 1).all()
    ids = [int(i) for i in ledger["token_id"]]
    assert ids and ledger["token"].tolist() == trainer.processing_class.convert_ids_to_tokens(ids)


def test_grpo_beta_positive_every_step_k3_equals_trl_kl(tiny: Path, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'k.db'}"  # a new file: watch creates the schema
    # Completions of one fixed length: TRL's `kl` is a mean of per-micro-batch token means,
    # klmon's k3 the token mean of the whole step; equal when micro-batches hold as many
    # tokens (the test of klmon's number, not of that averaging).
    run, trainer, logged = train(
        "grpo", tiny, tmp_path, db_url, 20, generation_kwargs={"min_new_tokens": 8}
    )
    db, steps, _ = stored(db_url, run.id)
    assert sorted(logged) == list(range(1, 21))
    assert steps.index.tolist() == sorted(logged), "every optimizer step stored, TRL's numbers"
    assert (steps["status"] == "ok").all()
    # 2 accumulation passes x 4 sequences per pass
    assert (steps["n_sequences"] == 8).all()
    for step, h in logged.items():
        assert steps.loc[step, "k3"] == pytest.approx(h["kl"], abs=1e-5), step
        assert steps.loc[step, "reward_mean"] == pytest.approx(h["reward"], abs=1e-5), step
        assert steps.loc[step, "kl_coef"] == pytest.approx(0.04)
    assert steps["k3"].iloc[-1] > steps["k3"].iloc[0], "the policy moved away from the reference"
    samples = read_samples(db, run.id, 20)
    assert samples and all(s.tokens and s.response is not None and s.prompt for s in samples)
    assert_ledger_named_by_tokenizer(db, run.id, steps, trainer)
    db.dispose()
    out = CliRunner().invoke(
        cli, ["alerts", "check", "--db", db_url, "--run", str(run.id), "--json"]
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["steps_evaluated"] == 20


def test_grpo_beta_zero_says_so_once_and_logs_what_it_has(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_url = f"sqlite:///{tmp_path / 'k.db'}"
    with caplog.at_level(logging.WARNING, logger="klmon"):
        run, _, logged = train(
            "grpo", tiny, tmp_path, db_url, 6, beta=0.0, mask_truncated_completions=True
        )
    said = [r for r in caplog.records if "beta=0" in r.getMessage()]
    assert len(said) == 1 and "no reference log-probs" in said[0].getMessage()
    db, steps, metrics = stored(db_url, run.id)
    assert steps.index.tolist() == sorted(logged)
    for step, h in logged.items():  # TRL's scalars fill the columns through the key table
        assert steps.loc[step, "reward_mean"] == pytest.approx(h["reward"], abs=1e-6)
        assert np.isnan(steps.loc[step, "k3"])
    m = metrics.set_index("step")
    # steps whose completions were all truncated (masked) have no tokens, so no such metric
    nll, entropy = m["klmon/policy_nll"].dropna(), m["klmon/entropy"].dropna()
    assert len(nll) >= 1 and (nll > 0).all() and (entropy > 0).all()
    db.dispose()


def test_grpo_all_truncated_batches_are_rejected_not_raised(tiny: Path, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'k.db'}"
    # Two tokens and no EOS allowed before them: every completion is truncated, so masked.
    run, _, logged = train(
        "grpo",
        tiny,
        tmp_path,
        db_url,
        4,
        max_completion_length=2,
        mask_truncated_completions=True,
        generation_kwargs={"min_new_tokens": 2},
    )
    db, steps, _ = stored(db_url, run.id)
    assert steps.index.tolist() == sorted(logged)
    assert (steps["status"] == "rejected").all()
    assert steps["reject_reason"].str.contains("empty response").all()
    assert run.stats["rejected"] == len(logged)
    db.dispose()


def test_rloo_k1_equals_trl_kl_and_rewards_match(tiny: Path, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'k.db'}"
    run, trainer, logged = train("rloo", tiny, tmp_path, db_url, 20)
    db, steps, _ = stored(db_url, run.id)
    assert_ledger_named_by_tokenizer(db, run.id, steps, trainer)
    assert steps.index.tolist() == sorted(logged) == list(range(1, 21))
    for step, h in logged.items():
        # RLOO logs the token mean of log p - log q over the generation: klmon's k1
        assert steps.loc[step, "k1"] == pytest.approx(h["kl"], abs=1e-5), step
        assert steps.loc[step, "reward_mean"] == pytest.approx(h["reward"], abs=1e-5), step
    assert (steps["n_sequences"] == 8).all()
    db.dispose()


def test_readme_plain_pytorch_loop_runs_as_written(tiny: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = README.read_text()
    section = text[text.index("### A plain PyTorch PPO loop") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    tok = AutoTokenizer.from_pretrained(tiny)
    policy = AutoModelForCausalLM.from_pretrained(tiny)
    ref = AutoModelForCausalLM.from_pretrained(tiny)
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    prompts = sentences(4, seed=2)

    def rollouts():
        for _ in range(3):
            enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
            n_prompt = enc["input_ids"].shape[1]
            ids = policy.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=True)
            attn = torch.ones_like(ids)
            attn[:, :n_prompt] = enc["attention_mask"]
            yield ids, attn, n_prompt

    def reward_model(ids, attn):
        return (ids == tok.convert_tokens_to_ids("happy")).float().sum(-1)

    def ppo_update(policy, ids, attn, lp, ref_lp, rewards):
        opt.zero_grad()
        logits = policy(ids, attention_mask=attn).logits[:, -ids.shape[1] : -1]
        (-logits.log_softmax(-1).mean()).backward()
        opt.step()

    db_url = f"sqlite:///{tmp_path / 'loop.db'}"
    os.environ["KLMON_DB_URL"] = db_url
    os.environ["KLMON_SPOOL_DIR"] = str(tmp_path / "sp")
    try:
        namespace = {
            "rollouts": rollouts(),
            "policy": policy,
            "ref": ref,
            "reward_model": reward_model,
            "ppo_update": ppo_update,
        }
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        del os.environ["KLMON_DB_URL"], os.environ["KLMON_SPOOL_DIR"]
    run = namespace["run"]
    db, steps, _ = stored(db_url, run.id)
    assert steps.index.tolist() == [0, 1, 2]
    assert (steps["status"] == "ok").all() and steps["k3"].notna().all()
    db.dispose()
