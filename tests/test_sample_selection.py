"""The processor's drill-down samples (``records.select_samples``) are exactly what a
straightforward reading of the rules gives: the same picks (kinds, indices, KL, reward) and the
same payload bytes as encoding each picked row on its own, with its texts and tokens cleaned
one by one. The fast path (one join of the tokens, the response columns of all picked rows
found at once) must never change a stored byte."""

from __future__ import annotations

import math
import random
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.formats import json_safe
from monitor.ingest.records import StepItem, WriterConfig, select_samples
from monitor.ingest.text import clean_text
from monitor.store import sample_codec
from monitor.store.sample_codec import encode_sample

# Strings neither database stores as they are (lone surrogates, NUL), non-ASCII and empty ones.
ODD = ["caf\u00e9", "\U0001f600", "\udcff", "\x00", "a\u0301", "\u4e2d", "", "tok", " w"]


def reference_samples(
    item: StepItem,
    seq_kl: np.ndarray,
    header: dict[str, Any],
    cfg: WriterConfig,
    seq_ids: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The rules of ``select_samples`` written plainly: a Python sort, a loop per token."""
    n = len(seq_kl)
    if n == 0 or (cfg.samples_top <= 0 and cfg.samples_random <= 0):
        return []
    key = [float(k) if math.isfinite(k) else -math.inf for k in seq_kl]
    top = sorted(range(n), key=lambda i: -key[i])[: max(cfg.samples_top, 0)]  # stable
    picked = [(i, "top") for i in top]
    rest = np.array([i for i in range(n) if i not in top], dtype=np.intp)
    if cfg.samples_random > 0 and len(rest):
        ident = (header.get("project"), header.get("name"), item.step, header.get("rank", 0))
        chooser = random.Random(zlib.crc32("\0".join(map(str, ident)).encode()))
        chosen = chooser.sample(list(rest), min(cfg.samples_random, len(rest)))
        picked += [(int(i), "random") for i in sorted(chosen)]
    lp, ref, mask = item.policy_logprobs, item.ref_logprobs, item.mask
    assert lp is not None and ref is not None
    width = lp.shape[1]
    out = []
    for i, kind in picked:
        cols = np.arange(width) if mask is None else np.flatnonzero(mask[i])
        prompt = response = None
        if item.texts is not None:
            prompts, responses = item.texts
            prompt = None if prompts is None else _clean(prompts[i])
            response = None if responses is None else _clean(responses[i])
        tokens = None
        if item.tokens is not None:
            row = list(item.tokens[i])
            if len(row) == width:
                row = [row[c] for c in cols]
            tokens = [clean_text(t if isinstance(t, str) else str(t)) for t in row]
        payload = encode_sample(
            lp[i][cols].astype(np.float32),
            ref[i][cols].astype(np.float32),
            prompt=prompt,
            response=response,
            tokens=tokens,
        )
        out.append(
            {
                "seq_index": i if seq_ids is None else int(seq_ids[i]),
                "kind": kind,
                "kl_seq": json_safe(float(seq_kl[i])),
                "reward": None if item.rewards is None else json_safe(float(item.rewards[i])),
                "payload": payload,
            }
        )
    return out


def _clean(value: Any) -> str | None:
    return None if value is None else clean_text(value if isinstance(value, str) else str(value))


_token = st.one_of(st.sampled_from(ODD), st.text(max_size=3))
_kl = st.sampled_from([0.0, -0.0, 0.5, 0.5, 1.25, -2.0, math.nan, math.inf, -math.inf])


@st.composite
def batches(draw: st.DrawFn) -> tuple[StepItem, np.ndarray, WriterConfig, np.ndarray | None]:
    b = draw(st.integers(1, 7))
    t = draw(st.integers(0, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    lp = (-rng.exponential(1.0, (b, t))).astype(dtype)
    ref = (lp + rng.normal(0, 0.3, (b, t))).astype(dtype)
    if draw(st.booleans()):
        lp[rng.random((b, t)) < 0.1] = np.nan
    mask_kind = draw(st.sampled_from(["none", "runs", "any"]))
    mask = None
    if mask_kind == "runs":  # the usual mask: one run of response positions per row
        start = rng.integers(0, max(t, 1), b)
        stop = np.minimum(start + rng.integers(0, t + 1, b), t)
        mask = (np.arange(t) >= start[:, None]) & (np.arange(t) < stop[:, None])
    elif mask_kind == "any":
        mask = rng.random((b, t)) < 0.6
    tokens = None
    token_kind = draw(st.sampled_from(["none", "aligned", "response", "ragged", "not str"]))
    if token_kind != "none":
        tokens = []
        for r in range(b):
            if token_kind == "aligned":
                n_tok = t
            elif token_kind == "response" and mask is not None:
                n_tok = int(mask[r].sum())
            else:
                n_tok = draw(st.integers(0, t + 2))
            row: list[Any] = draw(st.lists(_token, min_size=n_tok, max_size=n_tok))
            if token_kind == "not str" and row:
                row[draw(st.integers(0, len(row) - 1))] = draw(
                    st.sampled_from([7, None, 2.5, b"x"])
                )
            tokens.append(row if draw(st.booleans()) else tuple(row))
    texts = None
    if draw(st.booleans()):
        prompts = draw(
            st.none() | st.lists(_token | st.none() | st.integers(), min_size=b, max_size=b)
        )
        responses = draw(st.none() | st.lists(_token | st.none(), min_size=b, max_size=b))
        if responses is not None and tokens is not None and draw(st.booleans()):
            # responses that are their tokens joined (the payload keeps only the lengths)
            cols = [np.arange(t) if mask is None else np.flatnonzero(mask[r]) for r in range(b)]
            responses = [
                "".join(str(x) for x in ([row[c] for c in cols[r]] if len(row) == t else list(row)))
                for r, row in enumerate(tokens)
            ]
        texts = (prompts, responses)
    item = StepItem(
        step=draw(st.integers(0, 10**6)),
        wall_time=0.0,
        policy_logprobs=lp,
        ref_logprobs=ref,
        mask=mask,
        rewards=None if draw(st.booleans()) else rng.normal(size=b),
        texts=texts,
        tokens=tokens,
    )
    seq_kl = np.array(draw(st.lists(_kl, min_size=b, max_size=b)), dtype=np.float64)
    cfg = WriterConfig(
        samples_top=draw(st.integers(-1, 4)), samples_random=draw(st.integers(-1, 4))
    )
    seq_ids = None
    if draw(st.booleans()):
        seq_ids = np.sort(rng.choice(4 * b, size=b, replace=False))
    return item, seq_kl, cfg, seq_ids


@settings(max_examples=400, deadline=None)
@given(batch=batches(), rank=st.integers(0, 3), name=st.sampled_from(["n", "run \u00e9"]))
def test_samples_are_the_reference_picks_and_bytes(
    batch: tuple[StepItem, np.ndarray, WriterConfig, np.ndarray | None], rank: int, name: str
) -> None:
    item, seq_kl, cfg, seq_ids = batch
    header = {"project": "p", "name": name, "rank": rank}
    assert select_samples(item, seq_kl, header, cfg, seq_ids) == reference_samples(
        item, seq_kl, header, cfg, seq_ids
    )


def test_a_bench_sized_step_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A (64, 2048) step like the ingest benchmark's (one run of response positions per row,
    token strings for every column, texts), some of its strings odd; with the compiled
    per-value pass and with its numpy definition."""
    b, t = 64, 2048
    rng = np.random.default_rng(11)
    lp = -rng.exponential(1.0, (b, t)).astype(np.float32)
    ref = np.minimum(lp + rng.normal(0, 0.2, (b, t)).astype(np.float32), 0.0)
    mask = np.arange(t)[None, :] < rng.integers(t // 4, t + 1, b)[:, None]
    mask[5, 100] = False  # one row whose response is not one run
    tokens = [[f"tok{j}" for j in range(t)] for _ in range(b)]
    tokens[3][700] = "\udcff\x00"
    tokens[4][2] = 17
    seq_kl = ((lp - ref) * mask).sum(axis=1).astype(np.float64)
    seq_kl[[3, 4, 5]] = seq_kl.max() + 1.0  # the odd rows are picked
    responses = [f"response {i} \u00e9" for i in range(b)]
    responses[9] = "".join(tokens[9][: int(mask[9].sum())])
    item = StepItem(
        step=42,
        wall_time=0.0,
        policy_logprobs=lp,
        ref_logprobs=ref,
        mask=mask,
        rewards=rng.normal(size=b),
        texts=([f"prompt {i}\x00" for i in range(b)], responses),
        tokens=tokens,
    )
    header = {"project": "bench", "name": "r", "rank": 0}
    cfg = WriterConfig()
    want = reference_samples(item, seq_kl, header, cfg)
    assert [s["seq_index"] for s in want[:3]] == [3, 4, 5]
    assert select_samples(item, seq_kl, header, cfg) == want
    monkeypatch.setattr(sample_codec, "_planes", sample_codec._numpy_planes)
    assert select_samples(item, seq_kl, header, cfg) == want
