"""Steps built from several calls on one rank (micro-batches of different widths, gradient
accumulation): stored exactly as one log_step call carrying every row."""

from __future__ import annotations

import numpy as np
import pytest

import monitor
from monitor.errors import InvalidInput
from monitor.store.database import Database
from monitor.store.drilldown import read_histograms, read_samples
from monitor.store.steps import read_metrics, read_steps
from monitor.store.tables import STEP_QUANTITIES


def part(seed: int, b: int, t: int) -> dict:
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (b, t)).astype(np.float32)
    ref = np.minimum(lp + rng.normal(0, 0.3, (b, t)).astype(np.float32), 0.0)
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    return {
        "policy_logprobs": lp,
        "ref_logprobs": ref,
        "mask": mask,
        "rewards": rng.normal(size=b),
        "rollout_logprobs": np.minimum(lp + rng.normal(0, 0.05, (b, t)).astype(np.float32), 0),
        "texts": ([f"p{seed}-{i}" for i in range(b)], [f"r{seed}-{i}" for i in range(b)]),
        # aligned with this part's own columns: must still line up once padded
        "tokens": [[f"s{seed}r{i}c{j}" for j in range(t)] for i in range(b)],
    }


def concatenated(parts: list[dict]) -> dict:
    """What one call with every row looks like: right-padded to the widest part."""
    width = max(p["policy_logprobs"].shape[1] for p in parts)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, width - a.shape[1])))

    out = {
        k: np.concatenate([pad(p[k]) for p in parts])
        for k in ("policy_logprobs", "ref_logprobs", "mask", "rollout_logprobs")
    }
    out["rewards"] = np.concatenate([p["rewards"] for p in parts])
    out["texts"] = tuple([t for p in parts for t in p["texts"][i]] for i in (0, 1))
    out["tokens"] = [
        [t for t, keep in zip(toks, m, strict=True) if keep]
        for p in parts
        for toks, m in zip(p["tokens"], p["mask"], strict=True)
    ]
    return out


def start(db_url: str, tmp_path, name: str, **kw) -> monitor.Run:
    return monitor.init(
        "proj", name, db=db_url, spool_dir=tmp_path / name, flush_interval=0.01, **kw
    )


def stored(db: Database, run_id: int, step: int):
    row = read_steps(db, run_id).set_index("step").loc[step]
    samples = sorted(
        (s.seq_index, s.kind, s.prompt, s.response, tuple(s.tokens), round(s.kl_seq, 9))
        for s in read_samples(db, run_id, step)
    )
    hist_steps, counts = read_histograms(db, run_id)
    hist = counts[hist_steps.tolist().index(step)].tolist()
    return row, samples, hist


def test_parts_of_different_widths_equal_one_concatenated_call(db_url: str, tmp_path) -> None:
    parts = [part(1, 3, 5), part(2, 4, 11), part(3, 2, 8)]
    acc = start(db_url, tmp_path, "acc")
    one = start(db_url, tmp_path, "one")
    for p in parts:
        acc.add_to_step(4, kl_coef=0.05, metrics={"loss": 1.0}, **p)
    acc.add_to_step(5, **part(9, 2, 3))  # a later step closes step 4
    acc.close_step()
    one.log_step(4, kl_coef=0.05, metrics={"loss": 1.0}, **concatenated(parts))
    one.log_step(5, **part(9, 2, 3))
    for run in (acc, one):
        assert run.flush(20)
        run.finish()
    assert acc.stats["logged"] == 2 and acc.stats["written"] == 2
    db = Database.open(db_url)
    a_row, a_samples, a_hist = stored(db, acc.id, 4)
    o_row, o_samples, o_hist = stored(db, one.id, 4)
    for name in STEP_QUANTITIES:
        a, o = a_row[name], o_row[name]
        assert (a is None and o is None) or a == pytest.approx(o, rel=1e-12, nan_ok=True), name
    assert a_row["n_sequences"] == 9
    # the top-KL samples are the same rows with the same text and tokens (the random ones
    # are drawn with a seed that includes the run's name)
    assert [s for s in a_samples if s[1] == "top"] == [s for s in o_samples if s[1] == "top"]
    assert len(a_samples) == len(o_samples) == 5
    assert a_hist == o_hist
    assert read_metrics(db, acc.id)["loss"].dropna().tolist() == [1.0]
    db.dispose()


def test_closed_at_flush_empty_parts_and_bad_parts(db_url: str, tmp_path) -> None:
    run = start(db_url, tmp_path, "edge", on_invalid="log")
    good = part(1, 3, 6)
    truncated = {**part(2, 2, 4), "mask": np.zeros((2, 4), dtype=bool)}
    bad = {**part(3, 2, 4)}
    bad["policy_logprobs"] = np.full((2, 4), np.nan, dtype=np.float32)
    for p in (good, truncated, bad):
        run.add_to_step(0, **p)
    # a step whose every part is all-truncated: stored as rejected, never raised
    run.add_to_step(1, **truncated)
    assert run.flush(20), "flush closes the open step"
    run.finish()
    db = Database.open(db_url)
    steps = read_steps(db, run.id).set_index("step")
    assert steps.loc[0, "status"] == "ok" and steps.loc[0, "n_sequences"] == 3
    assert steps.loc[1, "status"] == "rejected"
    assert "empty response" in steps.loc[1, "reject_reason"]
    metrics = read_metrics(db, run.id).set_index("step")
    assert metrics.loc[0, "klmon/empty_responses"] == 2
    assert metrics.loc[0, "klmon/rejected_parts"] == 1
    assert run.stats["rejected"] == 1
    db.dispose()


def test_a_bad_part_raises_at_its_call_by_default(tmp_path) -> None:
    run = monitor.init("proj", "raise", db=f"sqlite:///{tmp_path / 'x.db'}", spool_dir=tmp_path)
    run.add_to_step(0, **part(1, 2, 4))
    with pytest.raises(InvalidInput, match="rewards given for some"):
        run.add_to_step(0, **{**part(2, 2, 4), "rewards": None})
    run.finish()


def test_ranks_each_accumulating_merge_exactly(db_url: str, tmp_path) -> None:
    parts = [part(1, 3, 5), part(2, 2, 9), part(3, 4, 7)]
    ranks = [start(db_url, tmp_path, "ddp", rank=r, world_size=2) for r in range(2)]
    single = start(db_url, tmp_path, "single")
    ranks[0].add_to_step(2, **parts[0])
    ranks[1].add_to_step(2, **parts[1])
    ranks[0].add_to_step(2, **parts[2])
    single.log_step(2, **concatenated([parts[0], parts[2], parts[1]]))
    for run in (*ranks, single):
        assert run.flush(20)
        run.finish()
    db = Database.open(db_url)
    merged = read_steps(db, ranks[0].id).iloc[0]
    want = read_steps(db, single.id).iloc[0]
    assert merged["status"] == "ok" and merged["n_sequences"] == 9
    for name in ("kl_mean", "kl_std", "k1", "k2", "k3", "reward_mean", "n_tokens"):
        assert merged[name] == pytest.approx(want[name], rel=1e-9), name
    db.dispose()
