"""The veRL (0.9.x) and OpenRLHF (0.11.x) adapters, driven by objects built to the fields
those frameworks document (their source, read at verl 0.9.1 and openrlhf 0.11.2): neither
installs on this CPU CI (Ray, vLLM, CUDA builds), so their classes are not imported."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import monitor
from monitor import divergence
from monitor.integrations import openrlhf, verl
from monitor.store.database import Database
from monitor.store.steps import read_steps
from monitor.store.vocabulary import read_token_ledger

VOCAB = [f"tok{i}" for i in range(30)]  # the trainer's tokenizer: id -> text


def micro(seed: int, b: int, t: int):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (b, t))
    ref = np.minimum(lp + rng.normal(0, 0.3, (b, t)), 0)
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, size=b)[:, None]
    return lp, ref, mask, rng.normal(size=b), rng.integers(0, len(VOCAB), (b, t))


def padded(parts):
    width = max(p[0].shape[1] for p in parts)
    pad = [[np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in (*p[:3], p[4])] for p in parts]
    lp, ref, mask, ids = (np.concatenate([p[i] for p in pad]) for i in range(4))
    return lp, ref, mask, np.concatenate([p[3] for p in parts]), ids


def start(db_url: str, tmp_path, name: str) -> monitor.Run:
    return monitor.init("proj", name, db=db_url, spool_dir=tmp_path / name, flush_interval=0.01)


def check(db_url: str, run: monitor.Run, step: int, parts) -> None:
    assert run.flush(20)
    run.finish()
    lp, ref, mask, rewards, ids = padded(parts)
    summary = divergence.summarize(lp, ref, mask, rewards=rewards, token_ids=ids)
    want = summary.as_dict()
    db = Database.open(db_url)
    row = read_steps(db, run.id).set_index("step").loc[step]
    ledger = read_token_ledger(db, run.id, k=len(VOCAB))
    db.dispose()
    for q in ("kl_mean", "k1", "k3", "reward_mean", "n_tokens", "vocab_top_share"):
        assert row[q] == pytest.approx(want[q], rel=1e-9), q
    # the sampled ids went along, named by the trainer's tokenizer
    full = summary.ledger
    pos = {
        int(i): int(c) for i, c, x in zip(full.ids, full.counts, full.lr_sums, strict=True) if x > 0
    }
    assert dict(zip(ledger["token_id"], ledger["count"], strict=True)) == pos
    assert ledger["token"].tolist() == [VOCAB[i] for i in ledger["token_id"]]


def test_verl_v1_trainer_mini_batches_from_the_transfer_queue(db_url: str, tmp_path) -> None:
    parts = [micro(1, 4, 6), micro(2, 4, 9)]
    store = {}

    class TensorDictLike(dict):
        def to_padded_tensor(self):
            return dict(self)

    def kv_batch_get(keys, partition_id, select_fields):
        lp, ref, mask, r, ids = store[keys]
        scores = np.zeros_like(lp)
        scores[:, 0] = r  # token-level scores, summed per sequence
        data = {
            "old_log_probs": lp,
            "ref_log_prob": ref,
            "response_mask": mask,
            "rm_scores": scores,
            "responses": ids,
        }
        return TensorDictLike({k: v for k, v in data.items() if k in select_fields})

    class V1Trainer:  # trainer_base.PPOTrainer's hooks: _compute_advantage, on_step_end
        global_steps = 7
        tokenizer = VOCAB

        def _compute_advantage(self, batch, metrics):
            return batch

        def on_step_end(self):
            return None

    trainer = V1Trainer()
    run = start(db_url, tmp_path, "verl-v1")
    assert verl.watch(trainer, run, kv_get=kv_batch_get) == "v1"
    for i, p in enumerate(parts):  # _step_once per mini-batch
        store[f"k{i}"] = p
        trainer._compute_advantage(SimpleNamespace(keys=f"k{i}", partition_id="train"), {})
    trainer.on_step_end()
    check(db_url, run, 7, parts)


def test_verl_legacy_fit_logs_at_update_actor(db_url: str, tmp_path) -> None:
    lp, ref, mask, r, ids = part = micro(3, 6, 8)
    scores = np.zeros_like(lp)
    scores[:, -1] = r

    class RayPPOTrainer:
        global_steps = 3
        tokenizer = VOCAB

        def _update_actor(self, batch):
            return batch

    trainer = RayPPOTrainer()
    run = start(db_url, tmp_path, "verl-legacy")
    assert verl.watch(trainer, run) == "legacy"
    batch = SimpleNamespace(
        batch={
            "old_log_probs": lp,
            "ref_log_prob": ref,
            "response_mask": mask,
            "token_level_scores": scores,
            "responses": ids,
        }
    )
    trainer._update_actor(batch)
    check(db_url, run, 3, [part])


def experience(part, *, kl_loss: bool):
    lp, ref, mask, r, ids = part
    prompt = np.full((len(ids), 3), 29)  # sequences: prompt then the actions
    return SimpleNamespace(
        sequences=np.concatenate([prompt, ids], axis=1),
        action_log_probs=lp,
        base_action_log_probs=ref if kl_loss else None,
        action_mask=mask,
        kl=lp - ref,  # estimator k1
        info={"reward": r},
    )


@pytest.mark.parametrize("kl_loss", [True, False])
def test_openrlhf_micro_batches_of_different_widths_are_one_step(
    db_url: str, tmp_path, kl_loss: bool
) -> None:
    parts = [micro(4, 2, 5), micro(5, 3, 12), micro(6, 2, 7)]

    class Maker:
        def make_experience_batch(self, rollout_samples):
            return [experience(p, kl_loss=kl_loss) for p in parts]

    class Trainer:
        experience_maker = Maker()
        tokenizer = VOCAB
        strategy = SimpleNamespace(
            args=SimpleNamespace(algo=SimpleNamespace(kl=SimpleNamespace(estimator="k1")))
        )

        def train_step(self, rollout_samples, global_step):
            self.experience_maker.make_experience_batch(rollout_samples)
            return {}, global_step + 1

    trainer = Trainer()
    run = start(db_url, tmp_path, f"orlhf-{kl_loss}")
    openrlhf.watch(trainer, run)
    trainer.train_step([], 12)
    check(db_url, run, 12, parts)
