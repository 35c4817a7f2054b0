"""The token ledger (drift vocabulary): exact per-id counts and sums of log p - log q, the
K bound and shares, merges across micro-batches and ranks, the vocabulary, bad token_ids,
the store reads and migration 0007."""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

import monitor
from monitor import divergence
from monitor.divergence import _compiled as compiled
from monitor.divergence.ledger import top_rows, vocab_top_share
from monitor.errors import InvalidInput
from monitor.store import (
    Database,
    read_steps,
    read_token_ledger,
    read_token_ledger_buckets,
    token_changes,
    token_changes_between_runs,
    upgrade,
)
from monitor.store.engine import make_engine
from monitor.store.steps import read_metrics


def batch(seed: int, b: int = 6, t: int = 12, vocab: int = 40):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (b, t))
    ref = np.minimum(lp + rng.normal(0, 0.5, (b, t)), 0.0)
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    ids = rng.integers(0, vocab, (b, t))
    return lp, ref, mask, ids


def brute(lp, ref, mask, ids) -> dict[int, tuple[int, float]]:
    out: dict[int, list] = defaultdict(lambda: [0, 0.0])
    for i in range(lp.shape[0]):
        for j in range(lp.shape[1]):
            if mask[i, j]:
                out[int(ids[i, j])][0] += 1
                out[int(ids[i, j])][1] += float(lp[i, j]) - float(ref[i, j])
    return {k: (c, s) for k, (c, s) in out.items()}


def start(db_url: str, tmp_path, name: str = "ledger", **kw) -> monitor.Run:
    kw.setdefault("flush_interval", 0.01)
    return monitor.init("proj", name, db=db_url, spool_dir=tmp_path / "spool", **kw)


def stored_ledger(db: Database, run_id: int, step: int) -> dict[int, tuple[int, float]]:
    with db.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT token_id, count, lr_sum FROM token_ledger WHERE run_id = :r AND step = :s"
            ),
            {"r": run_id, "s": step},
        ).all()
    return {int(i): (int(c), float(s)) for i, c, s in rows}


def expected_top(full: dict[int, tuple[int, float]], k: int) -> set[int]:
    pos = sorted((i for i in full if full[i][1] > 0), key=lambda i: (-full[i][1], i))[:k]
    neg = sorted((i for i in full if full[i][1] < 0), key=lambda i: (full[i][1], i))[:k]
    return set(pos) | set(neg)


# --- the math -----------------------------------------------------------------------------------


@contextmanager
def ledger_pass(which: str):
    """The compiled ledger pass (scatter-add into reusable buffers) or the numpy reference."""
    saved = compiled.extension
    if which == "compiled" and saved is None:
        pytest.skip("monitor._kernel was not built (no C compiler at install time)")
    compiled.extension = saved if which == "compiled" else None
    try:
        yield
    finally:
        compiled.extension = saved


@pytest.mark.parametrize("which", ["compiled", "numpy"])
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 5),
    t=st.integers(1, 9),
    vocab=st.sampled_from([3, 50, 2**23 + 5]),
    dtype=st.sampled_from([np.float64, np.float32]),
)
def test_ledger_is_exact_against_brute_force(
    which: str, seed: int, b: int, t: int, vocab: int, dtype
) -> None:
    lp, ref, mask, _ = batch(seed, b, t)
    lp, ref = lp.astype(dtype), ref.astype(dtype)
    mask[:, 0] = True
    ids = np.random.default_rng(seed + 1).integers(0, vocab, (b, t))
    with ledger_pass(which):
        s = divergence.summarize(lp, ref, mask, token_ids=ids)
    want = brute(lp, ref, mask, ids)
    got = {
        int(i): (int(c), float(x))
        for i, c, x in zip(s.ledger.ids, s.ledger.counts, s.ledger.lr_sums, strict=True)
    }
    assert got.keys() == want.keys()
    for i, (c, x) in want.items():
        assert got[i][0] == c and got[i][1] == pytest.approx(x, abs=1e-9)
    assert sum(c for c, _ in want.values()) == s.n_tokens
    pos = sorted((x for _, x in want.values() if x > 0), reverse=True)
    share = sum(pos[:5]) / sum(pos) if pos else 0.0
    assert s.vocab_top_share == pytest.approx(share, abs=1e-12)


def test_compiled_ledger_matches_numpy_on_a_large_batch() -> None:
    """Several row ranges on helper threads, int32 ids, a mask with padding, calls that reuse
    the buffers (one with an id past the buffers in between): the same ledger as numpy's."""
    if compiled.extension is None:
        pytest.skip("monitor._kernel was not built")
    rng = np.random.default_rng(3)
    lp, ref, mask, _ = batch(3, b=64, t=4096, vocab=10)
    for ids in (
        np.minimum(rng.zipf(1.3, lp.shape) - 1, 151_645).astype(np.int32),
        rng.integers(0, 2**23, lp.shape),  # past the buffers: np.unique
        np.minimum(rng.zipf(1.1, lp.shape) - 1, 50_000),
        rng.integers(0, 5, lp.shape),
    ):
        with ledger_pass("compiled"):
            got = divergence.summarize(lp, ref, mask, token_ids=ids).ledger
        with ledger_pass("numpy"):
            want = divergence.summarize(lp, ref, mask, token_ids=ids).ledger
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.counts, want.counts)
        np.testing.assert_allclose(got.lr_sums, want.lr_sums, rtol=1e-12, atol=1e-9)
    assert not any(buf.n or buf.acc.any() for buf in compiled._FREE_BUFFERS)


def test_top_rows_bound_and_masses_give_exact_shares() -> None:
    lp, ref, mask, ids = batch(3, b=16, t=32, vocab=500)
    s = divergence.summarize(lp, ref, mask, token_ids=ids)
    full = brute(lp, ref, mask, ids)
    for k in (1, 4, 32):
        top = top_rows(s.ledger, k)
        assert len(top.ids) <= 2 * k
        assert set(top.ids.tolist()) == expected_top(full, k)
        assert top.pos_mass == pytest.approx(sum(max(x, 0) for _, x in full.values()))
        assert top.neg_mass == pytest.approx(sum(min(x, 0) for _, x in full.values()))
        shares = np.maximum(top.lr_sums, 0) / top.pos_mass
        assert shares.sum() <= 1.0 + 1e-12
    assert vocab_top_share(s.ledger) == pytest.approx(
        np.sort(np.maximum(s.ledger.lr_sums, 0))[-5:].sum() / s.ledger.pos_mass
    )


def test_without_token_ids_nothing_changes() -> None:
    lp, ref, mask, _ = batch(1)
    s = divergence.summarize(lp, ref, mask)
    assert s.vocab_top_share is None and s.ledger is None
    assert s.as_dict()["vocab_top_share"] is None
    assert divergence.partials(lp, ref, mask)["ledger"] is None


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (np.zeros((6, 11), dtype=np.int64), "token_ids has shape (6, 11)"),
        (np.full((6, 12), 0.5), "token_ids has dtype float64"),
        (np.full((6, 12), -1), "token_ids[0, 0] is -1: token ids under the mask must be >= 0"),
    ],
)
def test_bad_token_ids_named_in_the_error(ids, message: str) -> None:
    lp, ref, mask, _ = batch(1)
    with pytest.raises(
        InvalidInput, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        divergence.summarize(lp, ref, mask, token_ids=ids)


def test_ragged_token_ids() -> None:
    seqs_lp = [np.array([-0.5, -1.0]), np.array([-0.2])]
    seqs_ref = [np.array([-1.0, -0.5]), np.array([-0.7])]
    s = divergence.summarize(seqs_lp, seqs_ref, token_ids=[[3, 4], [3]])
    pairs = zip(s.ledger.counts.tolist(), s.ledger.lr_sums.tolist(), strict=True)
    got = dict(zip(s.ledger.ids.tolist(), pairs, strict=True))
    assert got[3][0] == 2 and got[3][1] == pytest.approx(0.5 + 0.5)
    assert got[4] == (1, pytest.approx(-0.5))


def test_partials_merge_exactly_through_json() -> None:
    shards = [batch(10 + r, b=4) for r in range(3)]
    parts = [
        json.loads(json.dumps(divergence.partials(lp, ref, m, token_ids=i)))
        for lp, ref, m, i in shards
    ]
    merged = divergence.merge_partials(parts)
    cat = [np.concatenate([s[j] for s in shards]) for j in range(4)]
    whole = divergence.summarize(*cat[:3], token_ids=cat[3])
    assert merged.ledger.ids.tolist() == whole.ledger.ids.tolist()
    assert merged.ledger.counts.tolist() == whole.ledger.counts.tolist()
    np.testing.assert_allclose(merged.ledger.lr_sums, whole.ledger.lr_sums, rtol=0, atol=1e-12)
    assert merged.vocab_top_share == pytest.approx(whole.vocab_top_share, abs=1e-12)
    with pytest.raises(InvalidInput, match="token_ids were given for some shards"):
        divergence.merge_partials([parts[0], divergence.partials(*shards[1][:3])])


# --- the client and the store -------------------------------------------------------------------


class FakeTokenizer:
    def convert_ids_to_tokens(self, ids):
        return [f"<{i}>" for i in ids]


class DecodeOnly:
    def decode(self, ids):
        return "".join(f"[{i}]" for i in ids)


@pytest.mark.parametrize(
    ("vocab", "text_of"),
    [
        ([f"w{i}" for i in range(40)], lambda i: f"w{i}"),
        ({i: f"d{i}" for i in range(0, 40, 2)}, lambda i: f"d{i}" if i % 2 == 0 else None),
        (FakeTokenizer(), lambda i: f"<{i}>"),
        (DecodeOnly(), lambda i: f"[{i}]"),
    ],
)
def test_log_step_stores_the_ledger_and_texts(db_url: str, tmp_path, vocab, text_of) -> None:
    lp, ref, mask, ids = batch(5, b=8, t=16)
    with start(db_url, tmp_path, tokenizer=vocab, ledger_k=4) as run:
        run.log_step(3, policy_logprobs=lp, ref_logprobs=ref, mask=mask, token_ids=ids)
        run.log_step(4, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
        assert run.flush(20)
    db = Database.open(db_url)
    full = brute(lp, ref, mask, ids)
    got = stored_ledger(db, run.id, 3)
    assert set(got) == expected_top(full, 4)
    for i, (c, s) in got.items():
        assert c == full[i][0] and s == pytest.approx(full[i][1], abs=1e-9)
    steps = read_steps(db, run.id).set_index("step")
    pos = sorted((x for _, x in full.values() if x > 0), reverse=True)
    assert steps.loc[3, "vocab_top_share"] == pytest.approx(sum(pos[:5]) / sum(pos))
    assert pd.isna(steps.loc[4, "vocab_top_share"]) and stored_ledger(db, run.id, 4) == {}
    df = read_token_ledger(db, run.id)
    assert df["token"].tolist() == [text_of(i) for i in df["token_id"]]
    db.dispose()


def test_bad_token_ids_keep_the_step(db_url: str, tmp_path) -> None:
    lp, ref, mask, ids = batch(2)
    with start(db_url, tmp_path) as run:
        run.log_step(1, policy_logprobs=lp, ref_logprobs=ref, mask=mask, token_ids=-ids - 1)
        run.log_step(2, policy_logprobs=lp, ref_logprobs=ref, mask=mask, token_ids=ids[:, :-1])
        run.log_step(3, policy_logprobs=lp, ref_logprobs=ref, mask=mask, token_ids=ids * 0.5)
        assert run.flush(20)
    db = Database.open(db_url)
    steps = read_steps(db, run.id)
    kl = divergence.summarize(lp, ref, mask).kl_mean
    assert steps["kl_mean"].tolist() == pytest.approx([kl] * 3)
    assert (steps["status"] == "ok").all()
    metrics = read_metrics(db, run.id)
    assert metrics["klmon/rejected_token_ids"].tolist() == [1.0, 1.0, 1.0]
    assert all(stored_ledger(db, run.id, s) == {} for s in (1, 2, 3))
    db.dispose()


def test_micro_batches_store_what_one_call_stores(db_url: str, tmp_path) -> None:
    parts = [batch(20, b=3, t=5), batch(21, b=2, t=11), batch(22, b=4, t=8)]
    with start(db_url, tmp_path, name="parts", ledger_k=6) as run:
        for lp, ref, mask, ids in parts:
            run.add_to_step(9, policy_logprobs=lp, ref_logprobs=ref, mask=mask, token_ids=ids)
        run.close_step()
        assert run.flush(20)
    width = 11

    def pad(a):
        return np.pad(a, ((0, 0), (0, width - a.shape[1])))

    cat = [np.concatenate([pad(p[j]) for p in parts]) for j in range(4)]
    with start(db_url, tmp_path, name="one", ledger_k=6) as one:
        one.log_step(9, policy_logprobs=cat[0], ref_logprobs=cat[1], mask=cat[2], token_ids=cat[3])
        assert one.flush(20)
    db = Database.open(db_url)
    a, b = stored_ledger(db, run.id, 9), stored_ledger(db, one.id, 9)
    assert a.keys() == b.keys() and a
    for i in a:
        assert a[i][0] == b[i][0] and a[i][1] == pytest.approx(b[i][1], abs=1e-12)
    sa, sb = read_steps(db, run.id).iloc[0], read_steps(db, one.id).iloc[0]
    assert sa["vocab_top_share"] == pytest.approx(sb["vocab_top_share"], abs=1e-12)
    db.dispose()


def test_ranks_merge_the_ledger_exactly(db_url: str, tmp_path) -> None:
    shards = [batch(30 + r, b=5, t=10, vocab=60) for r in range(3)]
    runs = [start(db_url, tmp_path, name="ddp", rank=r, world_size=3, ledger_k=5) for r in range(3)]
    for r, (lp, ref, mask, ids) in enumerate(shards):
        runs[r].log_step(2, policy_logprobs=lp, ref_logprobs=ref, mask=mask, token_ids=ids)
        assert runs[r].flush(20)
    db = Database.open(db_url)
    full = brute(*[np.concatenate([s[j] for s in shards]) for j in range(4)])
    got = stored_ledger(db, runs[0].id, 2)
    assert set(got) == expected_top(full, 5)
    for i, (c, s) in got.items():
        assert c == full[i][0] and s == pytest.approx(full[i][1], abs=1e-9)
    with db.begin() as conn:
        pos, n = conn.execute(
            text("SELECT pos_mass, n_tokens FROM token_ledger_steps WHERE run_id = :r"),
            {"r": runs[0].id},
        ).one()
    assert pos == pytest.approx(sum(max(x, 0) for _, x in full.values()))
    assert n == sum(c for c, _ in full.values())
    for r in runs:
        r.finish()
    db.dispose()


def test_range_reads_buckets_and_changes(db_url: str, tmp_path) -> None:
    """Token 7 takes over from step 5 on: it leads the range, the later buckets and the
    changes; aggregates equal the sums of the stored rows."""
    rng = np.random.default_rng(0)
    steps = {}
    with start(db_url, tmp_path, tokenizer={7: "help"}, ledger_k=8) as run:
        for step in range(10):
            ids = rng.integers(0, 30, (4, 10))
            lp = -rng.exponential(1.0, (4, 10))
            ref = np.minimum(lp + rng.normal(0, 0.2, (4, 10)), 0.0)
            if step >= 5:
                ids[:, :5] = 7
                ref[:, :5] = lp[:, :5] - 2.0
            run.log_step(step, policy_logprobs=lp, ref_logprobs=ref, token_ids=ids)
            steps[step] = (lp, ref, ids)
        assert run.flush(20)
    db = Database.open(db_url)
    rows = {s: stored_ledger(db, run.id, s) for s in range(10)}
    df = read_token_ledger(db, run.id, 5, 9, k=3)
    assert df.iloc[0]["token_id"] == 7 and df.iloc[0]["token"] == "help"
    assert df.iloc[0]["count"] == sum(rows[s][7][0] for s in range(5, 10))
    assert df["lr_sum"].is_monotonic_decreasing and len(df) == 3
    pos_mass = df.attrs["pos_mass"]
    assert df["share_pos"].tolist() == pytest.approx((df["lr_sum"] / pos_mass).tolist())
    neg = read_token_ledger(db, run.id, 5, 9, k=3, side="neg")
    assert (neg["lr_sum"] < 0).all() and neg["lr_sum"].is_monotonic_increasing
    assert (neg["share_neg"] > 0).all()

    buckets = read_token_ledger_buckets(db, run.id, 0, 9, n_buckets=2, k=3)
    assert buckets.attrs["buckets"]["step_lo"].tolist() == [0, 5]
    seven = buckets[buckets["token_id"] == 7].set_index("bucket")
    assert seven.loc[1, "lr_sum"] == pytest.approx(sum(rows[s][7][1] for s in range(5, 10)))
    assert seven.loc[1, "share_pos"] > 0.5

    ch = token_changes(db, run.id, 4, 9, window=5, k=5)
    assert ch.iloc[0]["token_id"] == 7 and ch["growth"].is_monotonic_decreasing
    n_after = ch.attrs["n_tokens_after"]
    assert n_after == 200
    assert ch.iloc[0]["per_1k_after"] == pytest.approx(
        1000 * sum(rows[s][7][0] for s in range(5, 10)) / n_after
    )
    same = token_changes_between_runs(db, run.id, (0, 4), run.id, (5, 9), k=5)
    pd.testing.assert_frame_equal(same, ch, check_like=True)
    db.dispose()


def test_migration_0007_upgrades_from_0006_with_data(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine, "0006")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (id, project, name, status, source, created_at, last_seen_at, "
                "world_size, config, tags, n_steps) VALUES (1, 'p', 'old', 'finished', 'live', "
                "0, 0, 1, '{}', '[]', 1)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO steps (run_id, step, wall_time, status, ranks_seen, kl_mean) "
                "VALUES (1, 0, 0, 'ok', 1, 0.5)"
            )
        )
    upgrade(engine)
    engine.dispose()
    db = Database.open(empty_db_url)
    row = read_steps(db, 1).iloc[0]
    assert row["kl_mean"] == 0.5 and pd.isna(row["vocab_top_share"])
    assert read_token_ledger(db, 1).empty
    db.dispose()


class TensorLike:
    """Just enough of a torch tensor for ``to_numpy``: detach / cpu / numpy."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr

    def detach(self) -> TensorLike:
        return self

    def cpu(self) -> TensorLike:
        return self

    def numpy(self) -> np.ndarray:
        return self.arr  # shares memory, like torch


@pytest.mark.parametrize("wrap", [np.asarray, TensorLike])
def test_token_ids_are_copied_at_the_call(db_url: str, tmp_path, wrap) -> None:
    lp, ref, mask, ids = batch(8)
    buffer = ids.copy()
    with start(db_url, tmp_path, name="copied") as run:
        run.log_step(0, policy_logprobs=lp, ref_logprobs=ref, mask=mask, token_ids=wrap(buffer))
        buffer[:] = 0  # the trainer reuses its buffer at once
        assert run.flush(20)
    db = Database.open(db_url)
    full = brute(lp, ref, mask, ids)
    got = stored_ledger(db, run.id, 0)
    assert set(got) == expected_top(full, 32)
    db.dispose()


def test_a_spilled_step_keeps_its_token_ids(tmp_path) -> None:
    """A step spilled raw to the spool (queue full) is summarised later with its ledger."""
    from monitor.ingest.records import (
        StepItem,
        WriterConfig,
        item_from_raw,
        raw_record,
        summarize_item,
    )
    from monitor.ingest.spool import FILE_MAGIC, encode_record, iter_records

    lp, ref, mask, ids = batch(9)

    def item() -> StepItem:
        return StepItem(5, 1.0, lp.copy(), ref.copy(), mask.copy(), token_ids=ids.copy())

    header, cfg = {"rank": 0, "world_size": 1}, WriterConfig(ledger_k=3)
    direct = summarize_item(item(), header, cfg)
    spool = tmp_path / "a.klspool"
    spool.write_bytes(FILE_MAGIC + encode_record(raw_record(item(), 0)))
    (back,) = iter_records(spool)
    later = summarize_item(item_from_raw(back.record), header, cfg)
    assert later["ledger"] == direct["ledger"] and len(direct["ledger"]["ids"]) <= 6
    assert later["hash"] == direct["hash"]


def test_set_vocabulary_later_and_bad_sources(db_url: str, tmp_path) -> None:
    lp, ref, mask, ids = batch(4)
    with pytest.raises(InvalidInput, match="tokenizer is a int"):
        start(db_url, tmp_path, name="bad", tokenizer=3)
    with pytest.raises(InvalidInput, match="ledger_k is 0"):
        start(db_url, tmp_path, name="bad", ledger_k=0)
    with start(db_url, tmp_path, name="later") as run:
        run.set_vocabulary([f"v{i}" for i in range(40)])
        run.log_step(0, policy_logprobs=lp, ref_logprobs=ref, mask=mask, token_ids=ids)
        assert run.flush(20)
    db = Database.open(db_url)
    df = read_token_ledger(db, run.id, side="neg")
    assert len(df) and df["token"].tolist() == [f"v{i}" for i in df["token_id"]]
    db.dispose()


def test_negative_ids_outside_the_mask_are_padding() -> None:
    """Labels padded with -100 outside the response mask are fine; under it, refused."""
    lp, ref, mask, ids = batch(6)
    padded = np.where(mask, ids, -100)
    s = divergence.summarize(lp, ref, mask, token_ids=padded)
    assert s.ledger.counts.sum() == s.n_tokens
    assert brute(lp, ref, mask, ids).keys() == set(s.ledger.ids.tolist())
    i, j = np.argwhere(mask)[3]
    padded[i, j] = -5
    with pytest.raises(InvalidInput, match=rf"token_ids\[{i}, {j}\] is -5: token ids under the"):
        divergence.summarize(lp, ref, mask, token_ids=padded)


def spilled(tmp_path, item, vocabulary=None):
    """A raw record of ``item`` as the spool gives it back."""
    from monitor.ingest.records import raw_record
    from monitor.ingest.spool import FILE_MAGIC, encode_record, iter_records

    spool = tmp_path / f"s{item.step}.klspool"
    spool.write_bytes(FILE_MAGIC + encode_record(raw_record(item, 0, vocabulary)))
    (back,) = iter_records(spool)
    return back.record


def test_a_spilled_step_synced_without_the_tokenizer_names_its_ledger(db_url: str, tmp_path):
    """klmon sync has no tokenizer: the raw record carries the texts of its ids."""
    from monitor.ingest.apply import apply_records
    from monitor.ingest.records import StepItem
    from monitor.ingest.vocab import Vocabulary
    from monitor.store.runs import get_or_create_run

    lp, ref, mask, ids = batch(11)
    vocab = [f"w{i}" for i in range(40)]
    rec = spilled(tmp_path, StepItem(4, 1.0, lp, ref, mask, token_ids=ids), Vocabulary(vocab))
    db = Database.open(db_url)
    run = get_or_create_run(db, "proj", "synced")
    apply_records(db, run.id, {"rank": 0, "world_size": 1, "ledger_k": 4}, [rec])  # no cfg
    top = read_token_ledger(db, run.id, k=4)
    assert len(top) and top["token"].tolist() == [vocab[i] for i in top["token_id"]]
    db.dispose()


def test_a_replayed_raw_step_carries_its_texts_again() -> None:
    """The committer may summarise a spilled step twice (a failed write is replayed): ids
    sent by the first summary must not leave the second without texts."""
    from monitor.ingest.records import StepItem, WriterConfig, raw_config, summarize_item
    from monitor.ingest.vocab import Vocabulary

    lp, ref, mask, ids = batch(12)
    cfg = WriterConfig(ledger_k=4, vocabulary=Vocabulary([f"w{i}" for i in range(40)]))
    rec = {"vocab": []}
    header = {"rank": 0, "world_size": 1}
    for _ in range(2):
        item = StepItem(6, 1.0, lp.copy(), ref.copy(), mask.copy(), token_ids=ids.copy())
        out = summarize_item(item, header, raw_config(rec, cfg))
        assert sorted(i for i, _ in out["vocab"]) == sorted(out["ledger"]["ids"])


def test_a_spilled_step_keeps_its_token_ids_problem(tmp_path, caplog) -> None:
    from monitor.ingest.records import (
        TOKEN_IDS_REJECTED_METRIC,
        StepItem,
        WriterConfig,
        item_from_raw,
        summarize_item,
    )

    lp, ref, mask, _ = batch(13)
    item = StepItem(7, 1.0, lp, ref, mask, token_ids_problem="token_ids has dtype float64")
    rec = spilled(tmp_path, item)
    out = summarize_item(item_from_raw(rec), {"rank": 0, "world_size": 1}, WriterConfig())
    assert [TOKEN_IDS_REJECTED_METRIC, 1.0] in out["metrics"]
    # ids found bad in the background (a torch copy, checked there): one warning per run
    bad = np.full(lp.shape, -1)
    header = {"project": "p", "name": "warned-once", "rank": 0, "world_size": 1}
    with caplog.at_level("WARNING", logger="klmon"):
        for step in (1, 2, 3):
            it = StepItem(step, 1.0, lp.copy(), ref.copy(), mask.copy(), token_ids=bad)
            out = summarize_item(it, header, WriterConfig())
            assert [TOKEN_IDS_REJECTED_METRIC, 1.0] in out["metrics"]
    assert sum("without its token ledger" in r.getMessage() for r in caplog.records) == 1
