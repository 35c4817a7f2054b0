"""When the training loop outruns the background writer: the order in which it sheds load
(random samples, then every sample, then whole raw steps to the spool), the counters that say
what was shed, and that every shed step is still stored. Also that the live path (records
handed from the processor to the committer in memory, orjson encodings) stores exactly what
a replay of its spool stores, and the summary ``divergence.summarize`` computes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from support.db import down_url

import monitor
import monitor.ingest.writer as writer_module
from monitor import divergence
from monitor.ingest.records import WriterConfig
from monitor.ingest.sync import sync_spool
from monitor.ingest.writer import sample_budget
from monitor.store.database import Database
from monitor.store.drilldown import read_samples
from monitor.store.runs import delete_run, find_run_by_name
from monitor.store.sample_codec import LOGPROB_TOLERANCE
from monitor.store.steps import read_steps
from monitor.store.tables import STEP_QUANTITIES

B, T = 8, 16


def batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (B, T)).astype(np.float32)
    ref = np.minimum(lp + rng.normal(0, 0.3, (B, T)).astype(np.float32), 0.0)
    mask = np.arange(T)[None, :] < rng.integers(T // 2, T + 1, size=B)[:, None]
    return lp, ref, mask


def test_the_budget_sheds_random_samples_first_then_all_of_them() -> None:
    cfg = WriterConfig(samples_top=3, samples_random=2, queue_size=8, queue_bytes=800)
    by_items = [sample_budget(cfg, waiting, 0) for waiting in range(9)]
    assert by_items == [(3, 2)] * 2 + [(3, 0)] * 2 + [(0, 0)] * 5
    # the bytes of the waiting arrays count as much as their number
    assert sample_budget(cfg, 0, 199) == (3, 2)
    assert sample_budget(cfg, 0, 200) == (3, 0)
    assert sample_budget(cfg, 1, 400) == (0, 0)


def test_a_writer_behind_thins_samples_then_spills_and_stores_every_step(
    db_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The processor is held inside step 0 while the loop logs 14 more steps: 8 fill the queue
    # (queue_size=8), the other 6 are spilled raw. Released, it takes steps 1..8 with 7..0
    # steps waiting behind each: no samples at >= 4 waiting, top only at 2-3, all at 0-1.
    entered, release = threading.Event(), threading.Event()
    summarize = writer_module.summarize_item

    def held(item, header, cfg):
        if getattr(item, "step", None) == 0:
            entered.set()
            release.wait(30)
        return summarize(item, header, cfg)

    monkeypatch.setattr(writer_module, "summarize_item", held)
    n = 15
    with monitor.init(
        "proj", "shed", db=db_url, spool_dir=tmp_path / "spool", queue_size=8, flush_interval=0.01
    ) as run:
        run.log_step(0, policy_logprobs=batch(0)[0], ref_logprobs=batch(0)[1], mask=batch(0)[2])
        assert entered.wait(30)
        for step in range(1, n):
            lp, ref, mask = batch(step)
            run.log_step(step, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
        release.set()
        assert run.flush(60)
        stats = run.stats
    assert stats["spilled"] == n - 9
    assert stats["thinned"] == 6
    assert stats["samples_shed"] == 4 * 5 + 2 * 2
    assert stats["written"] == n and stats["dropped"] == 0

    db = Database.open(db_url)
    steps = read_steps(db, run.id)
    assert sorted(steps["step"]) == list(range(n))
    kept = {step: len(read_samples(db, run.id, step)) for step in range(n)}
    assert kept == {
        0: 5,
        **dict.fromkeys(range(1, 5), 0),
        **dict.fromkeys((5, 6), 3),
        **dict.fromkeys((7, 8), 5),
        **dict.fromkeys(range(9, n), 5),  # spilled: summarised later, with their samples
    }
    top = read_samples(db, run.id, 5)
    assert {s.kind for s in top} == {"top"}
    db.dispose()


def test_a_full_queue_waits_for_the_processor_rather_than_spill(
    db_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The processor is held inside step 0 and step 1 fills the queue (queue_size=1): step 2
    # finds it full and waits (SPILL_WAIT, raised here so the timing cannot matter) until the
    # processor, released meanwhile, takes step 1; then step 2 is queued, not spilled. Held
    # again inside step 2, the processor leaves step 4 to wait out SPILL_WAIT and spill.
    entered = {0: threading.Event(), 2: threading.Event()}
    release = {0: threading.Event(), 2: threading.Event()}
    summarize = writer_module.summarize_item

    def held(item, header, cfg):
        step = getattr(item, "step", None)
        if step in entered:
            entered[step].set()
            release[step].wait(30)
        return summarize(item, header, cfg)

    def log(run, step):
        lp, ref, mask = batch(step)
        run.log_step(step, policy_logprobs=lp, ref_logprobs=ref, mask=mask)

    monkeypatch.setattr(writer_module, "summarize_item", held)
    monkeypatch.setattr(writer_module, "SPILL_WAIT", 30.0)
    with monitor.init(
        "proj", "wait", db=db_url, spool_dir=tmp_path / "spool", queue_size=1, flush_interval=0.01
    ) as run:
        log(run, 0)
        assert entered[0].wait(30)
        log(run, 1)
        threading.Timer(0.1, release[0].set).start()
        log(run, 2)
        assert run.stats["spilled"] == 0
        assert entered[2].wait(30)
        log(run, 3)
        monkeypatch.setattr(writer_module, "SPILL_WAIT", 0.01)
        log(run, 4)
        assert run.stats["spilled"] == 1
        release[2].set()
        assert run.flush(60)
        stats = run.stats
    assert stats["written"] == 5 and stats["spilled"] == 1 and stats["dropped"] == 0
    db = Database.open(db_url)
    assert sorted(read_steps(db, run.id)["step"]) == list(range(5))
    db.dispose()


def _stored(db: Database, run_id: int) -> tuple[list[dict], dict[int, list[tuple]]]:
    steps = read_steps(db, run_id).sort_values("step")
    rows = [
        {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()}
        for r in steps[["step", *STEP_QUANTITIES]].to_dict("records")
    ]
    samples = {
        step: [
            (s.seq_index, s.kind, s.kl_seq, s.tokens, s.policy_logprobs, s.ref_logprobs)
            for s in read_samples(db, run_id, step)
        ]
        for step in steps["step"]
    }
    return rows, samples


def test_the_live_path_stores_what_a_replay_of_its_spool_stores(db_url: str, tmp_path) -> None:
    tokens = [[f"t{i}_{j}" for j in range(T)] for i in range(B)]
    steps = range(4)

    def log_all(url: str, spool: str, timeout: float) -> None:
        with monitor.init(
            "proj", "same", db=url, spool_dir=tmp_path / spool, exit_timeout=timeout
        ) as run:
            for step in steps:
                lp, ref, mask = batch(step)
                run.log_step(step, policy_logprobs=lp, ref_logprobs=ref, mask=mask, tokens=tokens)

    log_all(db_url, "live", 30)
    db = Database.open(db_url)
    live = find_run_by_name(db, "proj", "same")
    assert live is not None
    live_rows, live_samples = _stored(db, live.id)
    delete_run(db, live.id)

    log_all(down_url(db_url, tmp_path), "down", 0.2)  # everything stays in the spool
    sync_spool(db, tmp_path / "down")
    replayed = find_run_by_name(db, "proj", "same")
    assert replayed is not None
    assert _stored(db, replayed.id) == (live_rows, live_samples)

    # ... and that is the summary divergence.summarize computes, and the logged log-probs
    for row, step in zip(live_rows, steps, strict=True):
        lp, ref, mask = batch(step)
        want = divergence.summarize(lp, ref, mask=mask).as_dict()
        for c in STEP_QUANTITIES:
            if want.get(c) is None:
                assert row[c] is None
            else:
                assert row[c] == pytest.approx(want[c], rel=1e-12, abs=1e-15), c
        assert len(live_samples[step]) == 5
        for seq_index, _, _, toks, p, q in live_samples[step]:
            pos = np.flatnonzero(mask[seq_index])
            # stored on the sample codec's grid (sum-preserving rounding)
            assert p == pytest.approx(lp[seq_index, pos].astype(np.float64), abs=LOGPROB_TOLERANCE)
            assert q == pytest.approx(ref[seq_index, pos].astype(np.float64), abs=LOGPROB_TOLERANCE)
            assert toks == [tokens[seq_index][j] for j in pos]
    db.dispose()


def test_the_committer_reads_the_spool_where_it_kept_no_copy(db_url: str, tmp_path) -> None:
    # queue_bytes below one step's record: the committer keeps no copy of what was appended
    # (and the loop spills most steps raw), so it reads every record back from the spool,
    # across small segments that roll over every few records.
    tokens = [[f"t{i}_{j}" for j in range(T)] for i in range(B)]
    spool = tmp_path / "spool"
    with monitor.init(
        "proj", "back", db=db_url, spool_dir=spool, flush_interval=0.01, queue_bytes=1000
    ) as run:
        run._spool.max_segment_bytes = 4_000
        for step in range(30):
            lp, ref, mask = batch(step)
            run.log_step(step, policy_logprobs=lp, ref_logprobs=ref, mask=mask, tokens=tokens)
        assert run.flush(30)
        assert run._spool.segment > 10
        stats = run.stats
    assert stats["written"] == 30 and stats["corrupt"] == 0 and stats["duplicates"] == 0
    db = Database.open(db_url)
    assert sorted(read_steps(db, run.id)["step"]) == list(range(30))
    assert all(len(read_samples(db, run.id, step)) == 5 for step in range(30))
    assert not list(spool.glob("*.klspool"))  # every segment written and released
    db.dispose()
