"""The live client on SQLite and PostgreSQL: what log_step stores, input validation at the
call, rejected steps, duplicates and conflicts, out-of-order steps, multi-rank merges."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

import monitor
from monitor import divergence
from monitor.errors import InvalidInput
from monitor.store.database import Database
from monitor.store.drilldown import read_histograms, read_samples
from monitor.store.runs import find_run_by_name, get_run
from monitor.store.sample_codec import LOGPROB_TOLERANCE
from monitor.store.steps import read_metrics, read_steps


def batch(seed: int = 0, b: int = 8, t: int = 16, shift: float = 0.2):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (b, t)).astype(np.float32)
    ref = np.minimum(lp + rng.normal(0, shift, (b, t)).astype(np.float32), 0.0)
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    return lp, ref, mask


def start(db_url: str, tmp_path, name: str = "ppo", **kw) -> monitor.Run:
    kw.setdefault("flush_interval", 0.01)
    return monitor.init("proj", name, db=db_url, spool_dir=tmp_path / "spool", **kw)


def test_log_step_stores_summary_samples_histogram_metrics(db_url: str, tmp_path) -> None:
    b, t = 8, 16
    prompts = [f"prompt {i}" for i in range(b)]
    responses = [f"response {i}" for i in range(b)]
    tokens = [[f"t{i}_{j}" for j in range(t)] for i in range(b)]
    rewards = np.linspace(-1, 1, b)
    with start(db_url, tmp_path, config={"kl_coef": 0.05, "target_kl": 6}) as run:
        for step in range(3):
            lp, ref, mask = batch(step)
            run.log_step(
                step,
                policy_logprobs=lp,
                ref_logprobs=ref,
                mask=mask,
                rewards=rewards,
                kl_coef=0.05,
                texts=(prompts, responses),
                tokens=tokens,
                metrics={"loss/policy": 0.5 + step, "lr": 1e-6},
            )
        assert run.flush(20)
        stats = run.stats
    assert stats["logged"] == 3 and stats["written"] == 3 and stats["conflicts"] == 0
    db = Database.open(db_url)
    info = get_run(db, run.id)
    assert info.status == "finished" and info.config == {"kl_coef": 0.05, "target_kl": 6}
    assert info.last_seen_at >= info.created_at
    steps = read_steps(db, run.id)
    assert steps["step"].tolist() == [0, 1, 2]
    lp, ref, mask = batch(2)
    want = divergence.summarize(lp, ref, mask, rewards=rewards, kl_coef=0.05).as_dict()
    got = steps.iloc[2]
    for name in ("kl_mean", "kl_p95", "k1", "k3", "reward_mean", "kl_coef", "n_tokens"):
        assert got[name] == pytest.approx(want[name], rel=1e-9), name
    assert (steps["status"] == "ok").all()
    samples = read_samples(db, run.id, 2)
    assert len(samples) == 5
    assert sorted(s.kind for s in samples) == ["random", "random", "top", "top", "top"]
    seq_kl = divergence.sequence_kl(lp, ref, mask)
    top = [s for s in samples if s.kind == "top"]
    assert sorted(s.seq_index for s in top) == sorted(np.argsort(-seq_kl)[:3].tolist())
    s0 = top[0]
    n = int(mask[s0.seq_index].sum())
    assert s0.prompt == f"prompt {s0.seq_index}" and s0.response == f"response {s0.seq_index}"
    assert s0.tokens == tokens[s0.seq_index][:n]
    assert s0.kl_seq == pytest.approx(seq_kl[s0.seq_index])
    np.testing.assert_allclose(
        s0.policy_logprobs, lp[s0.seq_index, :n], atol=LOGPROB_TOLERANCE, rtol=0
    )
    assert s0.reward == pytest.approx(rewards[s0.seq_index])
    hsteps, counts = read_histograms(db, run.id)
    assert hsteps.tolist() == [0, 1, 2] and counts[2].sum() == mask.sum()
    metrics = read_metrics(db, run.id)
    assert metrics["loss/policy"].tolist() == [0.5, 1.5, 2.5]
    db.dispose()


def test_flush_does_not_wait_for_the_gathering_interval(db_url: str, tmp_path) -> None:
    # The committer lets steps gather for flush_interval before a transaction; a flush()
    # waiting for the database cuts that short (else this flush would time out).
    with start(db_url, tmp_path, name="gather", flush_interval=60.0) as run:
        for step in range(3):
            lp, ref, mask = batch(step)
            run.log_step(step, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
        assert run.flush(15)
        assert run.stats["written"] == 3
        lp, ref, mask = batch(3)
        run.log_step(3, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
        assert run.flush(15)  # a second gathering is cut short too
        assert run.stats["written"] == 4
    db = Database.open(db_url)
    assert read_steps(db, run.id)["step"].tolist() == [0, 1, 2, 3]
    db.dispose()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda lp, ref, m: (np.where(m, np.nan, lp).astype(np.float32), ref, m), "nan"),
        (lambda lp, ref, m: (lp, np.where(m, -np.inf, ref).astype(np.float32), m), "inf"),
        (lambda lp, ref, m: (lp + 0.5, ref, m), "<= 0"),
        (lambda lp, ref, m: (lp, ref[:, :-1], m), "shape"),
        (lambda lp, ref, m: (lp, ref, m[:-1]), "shape"),
        (lambda lp, ref, m: (lp, ref, np.zeros_like(m)), "every one of the .* empty response"),
        (lambda lp, ref, m: (lp[:0], ref[:0], None), "empty"),
        (lambda lp, ref, m: (lp.astype(str), ref, m), "dtype"),
    ],
)
def test_invalid_input_is_rejected_at_the_call(change, message, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'unused.db'}"
    run = start(url, tmp_path)
    try:
        lp, ref, mask = change(*batch())
        with pytest.raises(InvalidInput, match=message):
            run.log_step(0, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
        assert run.stats["logged"] == 0
    finally:
        run.finish(timeout=0.5)


def test_empty_responses_are_left_out_and_counted(db_url: str, tmp_path, caplog) -> None:
    """An empty response (the policy emitted EOS at once) has no KL: the step keeps the other
    sequences, counts the empty ones in a metric, and sample indices stay those of the batch."""
    run = start(db_url, tmp_path)
    lp, ref, mask = batch()
    mask[[1, 4]] = False
    b = len(mask)
    texts = ([f"prompt {i}" for i in range(b)], [f"response {i}" for i in range(b)])
    rewards = np.arange(b, dtype=np.float64)
    with caplog.at_level(logging.WARNING, logger="klmon"):
        for step in (0, 1):
            run.log_step(step, policy_logprobs=lp, ref_logprobs=ref, mask=mask, texts=texts,
                         rewards=rewards)  # fmt: skip
        assert run.flush(20)
    run.finish()
    assert sum("empty response" in r.getMessage() for r in caplog.records) == 1  # once per run
    db = Database.open(db_url)
    steps = read_steps(db, run.id)
    keep = np.flatnonzero(mask.any(axis=1))
    want = divergence.summarize(lp[keep], ref[keep], mask[keep], rewards=rewards[keep])
    assert steps["n_sequences"].tolist() == [b - 2, b - 2]
    assert steps["kl_mean"].iloc[0] == pytest.approx(want.kl_mean, rel=1e-6)
    assert steps["reward_mean"].iloc[0] == pytest.approx(rewards[keep].mean())
    assert read_metrics(db, run.id)["klmon/empty_responses"].tolist() == [2, 2]
    samples = read_samples(db, run.id, 0)
    assert samples and {s.seq_index for s in samples} <= set(keep.tolist())
    for s in samples:
        assert s.prompt == f"prompt {s.seq_index}" and s.reward == rewards[s.seq_index]
    db.dispose()


def test_bad_values_outside_the_mask_are_fine(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'unused.db'}"
    run = start(url, tmp_path)
    lp, ref, mask = batch()
    lp = np.where(mask, lp, np.nan).astype(np.float32)  # padding holds NaN
    ref = np.where(mask, ref, 3.0).astype(np.float32)  # or garbage
    run.log_step(0, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
    with pytest.raises(InvalidInput, match="rewards"):
        run.log_step(1, policy_logprobs=lp, ref_logprobs=ref, mask=mask, rewards=[1.0])
    with pytest.raises(InvalidInput, match="texts"):
        run.log_step(1, policy_logprobs=lp, ref_logprobs=ref, mask=mask, texts=(["a"], ["b"]))
    with pytest.raises(InvalidInput, match="metrics"):
        run.log_step(1, policy_logprobs=lp, ref_logprobs=ref, mask=mask, metrics={"x": "hi"})
    run.finish(timeout=0.5)
    with pytest.raises(InvalidInput, match="finished"):
        run.log_step(2, policy_logprobs=lp, ref_logprobs=ref, mask=mask)


def test_on_invalid_log_stores_a_rejected_step(db_url: str, tmp_path) -> None:
    with start(db_url, tmp_path, on_invalid="log") as run:
        lp, ref, mask = batch()
        run.log_step(0, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
        run.log_step(1, policy_logprobs=lp + 1.0, ref_logprobs=ref, mask=mask)
        run.log_step(2, policy_logprobs=lp, ref_logprobs=ref[:, :3], mask=mask)
        assert run.flush(20)
        stats = run.stats
    assert stats["rejected"] == 2 and stats["logged"] == 3
    db = Database.open(db_url)
    steps = read_steps(db, run.id)
    assert steps["status"].tolist() == ["ok", "rejected", "rejected"]
    assert "log-prob" in steps.iloc[1]["reject_reason"]
    assert "shape" in steps.iloc[2]["reject_reason"]
    assert np.isnan(steps.iloc[1]["kl_mean"])
    db.dispose()


def test_duplicates_conflicts_and_out_of_order(db_url: str, tmp_path) -> None:
    with start(db_url, tmp_path) as run:
        a, b_ = batch(1), batch(2)
        run.log_step(5, policy_logprobs=a[0], ref_logprobs=a[1], mask=a[2])
        run.log_step(3, policy_logprobs=b_[0], ref_logprobs=b_[1], mask=b_[2])  # out of order
        run.log_step(5, policy_logprobs=a[0], ref_logprobs=a[1], mask=a[2])  # replay: no-op
        run.log_step(5, policy_logprobs=b_[0], ref_logprobs=b_[1], mask=b_[2])  # conflict
        assert run.flush(20)
        stats = run.stats
    assert stats["out_of_order"] == 1
    assert stats["written"] == 2 and stats["duplicates"] == 1 and stats["conflicts"] == 1
    db = Database.open(db_url)
    steps = read_steps(db, run.id)
    assert steps["step"].tolist() == [3, 5]
    want = divergence.summarize(*a).kl_mean
    assert steps.iloc[1]["kl_mean"] == pytest.approx(want), "a conflict never overwrites"
    assert len(read_samples(db, run.id, 5)) == 5, "a replay stores no second set of samples"
    db.dispose()


def test_context_manager_marks_a_crash(db_url: str, tmp_path) -> None:
    with pytest.raises(RuntimeError), start(db_url, tmp_path) as run:
        lp, ref, mask = batch()
        run.log_step(0, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
        raise RuntimeError("diverged")
    db = Database.open(db_url)
    assert get_run(db, run.id).status == "crashed"
    assert len(read_steps(db, run.id)) == 1
    db.dispose()


class FakeTensor:
    """Just enough of torch.Tensor: detach / cpu / numpy, a device, bfloat16 refusing numpy."""

    def __init__(self, arr: np.ndarray, device: str = "cpu", bf16: bool = False) -> None:
        self.arr, self.bf16 = arr, bf16
        self.device = type("Device", (), {"type": device})()

    def detach(self) -> FakeTensor:
        return self

    def cpu(self) -> FakeTensor:
        return FakeTensor(self.arr.copy(), "cpu", self.bf16)

    def float(self) -> FakeTensor:
        return FakeTensor(self.arr.astype(np.float32), self.device.type)

    def numpy(self) -> np.ndarray:
        if self.bf16:
            raise TypeError("Got unsupported ScalarType BFloat16")
        return self.arr  # shares memory, like torch


def test_torch_like_tensors_are_copied(db_url: str, tmp_path) -> None:
    lp, ref, mask = batch()
    t_lp = FakeTensor(lp.copy())
    with start(db_url, tmp_path) as run:
        run.log_step(
            0,
            policy_logprobs=t_lp,
            ref_logprobs=FakeTensor(ref, device="cuda", bf16=True),
            mask=FakeTensor(mask),
        )
        t_lp.arr[:] = 0.0  # the trainer reuses its buffer right away
        assert run.flush(20)
    db = Database.open(db_url)
    got = read_steps(db, run.id).iloc[0]["kl_mean"]
    assert got == pytest.approx(divergence.summarize(lp, ref, mask).kl_mean)
    db.dispose()


def test_ranks_merge_exactly_and_partial_until_all_arrive(db_url: str, tmp_path) -> None:
    shards = [batch(10 + r, b=6) for r in range(3)]
    rewards = [np.arange(6.0) + 10 * r for r in range(3)]
    runs = [start(db_url, tmp_path, name="ddp", rank=r, world_size=3) for r in range(3)]
    for r in (0, 1):
        lp, ref, mask = shards[r]
        runs[r].log_step(7, policy_logprobs=lp, ref_logprobs=ref, mask=mask, rewards=rewards[r])
        assert runs[r].flush(20)
    db = Database.open(db_url)
    run_id = runs[0].id
    row = read_steps(db, run_id).iloc[0]
    assert row["status"] == "partial" and row["ranks_seen"] == 2
    lp, ref, mask = shards[2]
    runs[2].log_step(7, policy_logprobs=lp, ref_logprobs=ref, mask=mask, rewards=rewards[2])
    # the same shard again (a replay) and a different one for rank 1: no-op and conflict
    runs[1].log_step(
        7,
        policy_logprobs=shards[1][0],
        ref_logprobs=shards[1][1],
        mask=shards[1][2],
        rewards=rewards[1],
    )
    runs[1].log_step(
        7,
        policy_logprobs=shards[0][0],
        ref_logprobs=shards[0][1],
        mask=shards[0][2],
        rewards=rewards[1],
    )
    for r in runs:
        assert r.flush(20)
    assert runs[1].stats["duplicates"] == 1 and runs[1].stats["conflicts"] == 1
    row = read_steps(db, run_id).iloc[0]
    assert row["status"] == "ok" and row["ranks_seen"] == 3
    full = divergence.summarize(
        np.concatenate([s[0] for s in shards]),
        np.concatenate([s[1] for s in shards]),
        np.concatenate([s[2] for s in shards]),
        rewards=np.concatenate(rewards),
    ).as_dict()
    for name in ("kl_mean", "kl_std", "kl_p05", "kl_p50", "kl_p99", "k1", "k3", "reward_std"):
        assert row[name] == pytest.approx(full[name], rel=1e-9), name
    assert row["n_tokens"] == full["n_tokens"] and row["n_sequences"] == 18
    _, counts = read_histograms(db, run_id)
    assert counts[0].sum() == full["n_tokens"]
    assert {s.rank for s in read_samples(db, run_id, 7)} == {0, 1, 2}
    for r in runs:
        r.finish()
    db.dispose()


def test_concurrent_last_ranks_complete_the_step(db_url: str, tmp_path) -> None:
    """Two ranks finishing the same steps at the same moment: every step ends 'ok'."""
    world = 2
    runs = [start(db_url, tmp_path, name="race", rank=r, world_size=world) for r in range(world)]
    barrier = threading.Barrier(world)

    def work(r: int) -> None:
        barrier.wait()
        for step in range(15):
            lp, ref, mask = batch(step * 10 + r, b=4, t=8)
            runs[r].log_step(step, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
        runs[r].flush(30)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    db = Database.open(db_url)
    steps = read_steps(db, runs[0].id)
    assert len(steps) == 15
    assert (steps["status"] == "ok").all(), steps[["step", "status", "ranks_seen"]]
    for r in runs:
        r.finish()
    db.dispose()


def test_ragged_sequences_and_one_sequence(db_url: str, tmp_path) -> None:
    seqs_p = [np.array([-0.8, -0.4]), np.array([-1.0, -0.2, -0.3])]
    seqs_q = [np.array([-1.5, -2.1]), np.array([-1.0, -0.5, -0.1])]
    with start(db_url, tmp_path) as run:
        run.log_step(0, policy_logprobs=seqs_p, ref_logprobs=seqs_q)
        run.log_step(1, policy_logprobs=[-0.8, -0.4], ref_logprobs=[-1.5, -2.1])
        with pytest.raises(InvalidInput, match="same length"):
            run.log_step(2, policy_logprobs=seqs_p, ref_logprobs=[np.zeros(2), np.zeros(2)])
        assert run.flush(20)
    db = Database.open(db_url)
    steps = read_steps(db, run.id)
    want = divergence.summarize(seqs_p, seqs_q).as_dict()
    assert steps.iloc[0]["kl_mean"] == pytest.approx(want["kl_mean"])
    assert steps.iloc[0]["n_tokens"] == 5
    assert steps.iloc[1]["kl_mean"] == pytest.approx(2.4)  # the 'Good day' example
    db.dispose()


def test_a_forked_child_never_finishes_the_parents_run(tmp_path) -> None:
    import os

    from monitor.ingest import client

    url = f"sqlite:///{tmp_path / 'unused.db'}"
    run = start(url, tmp_path)
    lp, ref, mask = batch()
    run.log_step(0, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            client._finish_live_runs()  # what the child's interpreter exit would run
            try:
                run.log_step(1, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
                code = 1
            except InvalidInput as exc:
                code = 0 if "parent process" in str(exc) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    path = run.spool_path
    assert path is not None and path.exists(), "the child left the parent's spool alone"
    run.log_step(1, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
    run.finish(timeout=0.5)


def test_validate_shapes_defers_value_checks_to_the_background(db_url: str, tmp_path) -> None:
    with start(db_url, tmp_path, validate="shapes") as run:
        lp, ref, mask = batch()
        run.log_step(0, policy_logprobs=lp + 1.0, ref_logprobs=ref, mask=mask)  # no raise
        with pytest.raises(InvalidInput, match="shape"):  # shapes are still checked
            run.log_step(1, policy_logprobs=lp, ref_logprobs=ref[:, :2], mask=mask)
        assert run.flush(20)
        assert run.stats["rejected"] == 1
    db = Database.open(db_url)
    row = read_steps(db, run.id).iloc[0]
    assert row["status"] == "rejected" and "log-probability" in row["reject_reason"]
    db.dispose()


# --- one validator: the client reads and refuses input as monitor.divergence does --------------


def _build(**kw):
    from monitor.ingest.step_input import StepArgs, build_item

    return build_item(0, 0.0, StepArgs(**kw))


def _refusal(fn) -> str:
    with pytest.raises(InvalidInput) as info:
        fn()
    return str(info.value)


def _with(name: str, pos, value):
    def change(args: dict) -> dict:
        a = np.array(args[name], dtype=np.float64)
        a[pos] = value
        return {**args, name: a}

    return change


ONE_MESSAGE_CASES = {
    "nan under the mask": _with("policy_logprobs", (1, 0), np.nan),
    "positive log-prob": _with("ref_logprobs", (2, 3), 0.5),
    "mask of 0.5": lambda a: {**a, "mask": a["mask"] * 0.5},
    "mask shape": lambda a: {**a, "mask": a["mask"][:, :-1]},
    "ref shape": lambda a: {**a, "ref_logprobs": a["ref_logprobs"][:-1]},
    "strings": lambda a: {**a, "policy_logprobs": a["policy_logprobs"].astype(str)},
    "negative entropy": lambda a: {**a, "entropies": np.where(a["mask"], -0.5, 0.0)},
    "positive rollout": lambda a: {**a, "rollout_logprobs": a["policy_logprobs"] + 2.0},
    "one sequence": lambda a: {
        "policy_logprobs": np.array([-1.0, np.inf]),
        "ref_logprobs": np.array([-1.0, -1.0]),
    },
    "ragged lengths": lambda a: {
        "policy_logprobs": [np.array([-1.0]), np.array([-1.0, -2.0, -3.0])],
        "ref_logprobs": [np.array([-1.0]), np.array([-1.0, -2.0])],
    },
    "ragged nan": lambda a: {
        "policy_logprobs": [[-1.0], [-1.0, -2.0, np.nan]],
        "ref_logprobs": [[-1.0], [-1.0, -2.0, -3.0]],
    },
    "rewards": lambda a: {**a, "rewards": np.where(np.arange(8) == 3, np.nan, 0.0)},
    "kl_coef": lambda a: {**a, "kl_coef": float("inf")},
}


@pytest.mark.parametrize("change", ONE_MESSAGE_CASES.values(), ids=ONE_MESSAGE_CASES.keys())
def test_the_client_refuses_bad_input_with_divergences_message(change) -> None:
    """log_step's checks at the call are monitor.divergence's: same verdict, same words."""
    lp, ref, mask = batch()
    args = change({"policy_logprobs": lp, "ref_logprobs": ref, "mask": mask})
    at_the_call = _refusal(lambda: _build(**args))
    assert at_the_call == _refusal(lambda: divergence.summarize(**args))


def test_a_list_of_equal_length_sequences_is_the_array_it_lists() -> None:
    lp, ref, _ = batch()
    dense = _build(policy_logprobs=lp, ref_logprobs=ref)
    listed = _build(policy_logprobs=list(lp), ref_logprobs=[r.tolist() for r in ref])
    assert listed.mask is None and listed.policy_logprobs.dtype == dense.policy_logprobs.dtype
    np.testing.assert_array_equal(listed.policy_logprobs, dense.policy_logprobs)
    np.testing.assert_array_equal(listed.ref_logprobs, ref.astype(np.float64))


def test_ragged_optional_inputs_are_lists_of_sequences_like_the_log_probs() -> None:
    lp = [[-0.8, -0.4], [-1.0, -0.2, -0.3]]
    item = _build(
        policy_logprobs=lp, ref_logprobs=lp, rollout_logprobs=lp, entropies=[[0.1, 0.2], [0.3] * 3]
    )
    assert item.mask.tolist() == [[True, True, False], [True, True, True]]
    assert item.extra["rollout_logprobs"].shape == item.extra["entropies"].shape == (2, 3)


def test_bfloat16_arrays_are_widened_to_float32_as_divergence_reads_them() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed: no bfloat16")
    lp, ref, mask = batch()
    item = _build(
        policy_logprobs=lp.astype(ml_dtypes.bfloat16),
        ref_logprobs=ref.astype(ml_dtypes.bfloat16),
        mask=mask,
    )
    assert item.policy_logprobs.dtype == item.ref_logprobs.dtype == np.float32
    np.testing.assert_array_equal(item.policy_logprobs, lp.astype(ml_dtypes.bfloat16))


def test_a_training_process_loads_neither_pandas_nor_the_orm(db_url: str, tmp_path) -> None:
    """What logging costs a training process at start-up: the client and its writer bind
    tuples through SQLAlchemy Core, so pandas, the ORM and Alembic stay out of it."""
    import json
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, monitor\n"
        f"run = monitor.init('p', 'r', db={db_url!r}, spool_dir={str(tmp_path / 'spool')!r})\n"
        "lp = np.full((4, 16), -1.0, np.float32)\n"
        "for s in range(3):\n"
        "    run.log_step(s, policy_logprobs=lp, ref_logprobs=lp - 0.2, metrics={'loss': s})\n"
        "run.finish()\n"
        "print(sorted(m for m in ('pandas', 'sqlalchemy.orm', 'alembic', 'monitor.store.models')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')) == []
    db = Database.open(db_url)
    run = find_run_by_name(db, "p", "r")
    assert run is not None and read_steps(db, run.id)["step"].tolist() == [0, 1, 2]
