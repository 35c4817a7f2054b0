"""The sample payload's codec: the compiled per-value pass (``monitor/_codec.c``) writes the
same bytes as its numpy definition, and payloads stored by older klmon (format 1, zlib)
still read. The processor's picks and their payloads: ``test_sample_selection.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.store import sample_codec
from monitor.store.sample_codec import (
    FORMAT_VERSION,
    GRID_LIMIT,
    decode_sample,
    encode_sample,
)

compiled = sample_codec._compiled_planes
needs_compiled = pytest.mark.skipif(compiled is None, reason="monitor._codec is not built")

# Texts and tokens that are not plain ASCII: accents, astral planes, a lone surrogate, NUL.
ODD = ["caf\u00e9", "\U0001f600", "\udcff", "\x00", "a\u0301", "\u4e2d", ""]
_values = st.one_of(
    st.floats(-60, 0, width=32),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(allow_nan=True, allow_infinity=True),  # beyond GRID_LIMIT too
    st.sampled_from([0.0, -0.0, -0.00005, -0.00015, GRID_LIMIT, -GRID_LIMIT, -1e300]),
)


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(_values, _values), max_size=200),
    dtypes=st.sampled_from(
        [(np.float32, np.float32), (np.float64, np.float64), (np.float32, np.float64)]
    ),
    tokens=st.one_of(st.none(), st.lists(st.sampled_from(ODD) | st.text(max_size=4))),
)
def test_compiled_planes_are_the_numpy_planes(
    pairs: list[tuple[float, float]], dtypes: tuple[type, type], tokens: list[str] | None
) -> None:
    with np.errstate(over="ignore", invalid="ignore"):
        lp = np.array([a for a, _ in pairs], dtype=dtypes[0])
        ref = np.array([b for _, b in pairs], dtype=dtypes[1])
    args = (lp, ref, tokens, 10.0**sample_codec.LOGPROB_DECIMALS, GRID_LIMIT)
    assert compiled(*args) == sample_codec._numpy_planes(*args)


@needs_compiled
def test_compiled_and_numpy_payloads_are_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    lp = -rng.exponential(1.0, 1500).astype(np.float32)
    ref = (lp + rng.normal(0, 0.1, 1500)).astype(np.float32)
    lp[[4, 9]] = [np.nan, -np.inf]
    tokens = [ODD[i % len(ODD)] + str(i) for i in range(1500)]
    kwargs = {"prompt": "p\udcff", "response": "r", "tokens": tokens, "token_ids": np.arange(1500)}
    fast = encode_sample(lp, ref, **kwargs)
    monkeypatch.setattr(sample_codec, "_planes", sample_codec._numpy_planes)
    assert encode_sample(lp, ref, **kwargs) == fast
    assert fast[0] == FORMAT_VERSION == 3


@needs_compiled
def test_compiled_planes_refuse_what_is_not_a_float_vector_or_a_str_list() -> None:
    ok = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="policy_logprobs"):
        compiled(np.zeros(3, np.int32), ok, None, 1e4, GRID_LIMIT)
    with pytest.raises(TypeError, match="ref_logprobs"):
        compiled(ok, np.zeros((3, 1), np.float32), None, 1e4, GRID_LIMIT)
    with pytest.raises(ValueError, match="differ in length"):
        compiled(ok, np.zeros(2, np.float32), None, 1e4, GRID_LIMIT)
    with pytest.raises(TypeError, match="token 1 is not a str"):
        compiled(ok, ok, ["a", 3, "c"], 1e4, GRID_LIMIT)


@pytest.mark.parametrize("joined_tokens", [None, "a3"])
def test_a_token_that_is_not_a_str_is_refused(joined_tokens: str | None) -> None:
    """The processor cleans its tokens (str() of others) before encoding; encode_sample
    itself refuses them, whether or not it is handed their join."""
    with pytest.raises(TypeError):
        encode_sample([-1.0, -2.0], [-1.0, -2.0], tokens=["a", 3], joined_tokens=joined_tokens)


def test_values_beyond_the_grid_limit_are_kept_exactly() -> None:
    lp = [-0.5, -3e5, -1e300, -1.0]
    ref = [-0.25, -1.0, -2.0, -2e5]
    d = decode_sample(encode_sample(lp, ref))
    assert d.policy_logprobs.tolist() == lp and d.ref_logprobs.tolist() == ref


# A payload as klmon stored it before format 3 (format 1: one zlib stream), with texts,
# tokens, token ids and non-finite values: encode_sample(
#     [-0.8, -0.4251, nan, -2.0], [-1.5, -0.5, -1.0, -inf], prompt="café",
#     response="A😀 b", tokens=["A", "😀", " b", "\udcff"], token_ids=[5, 70000, 12, 0])
STORED_V1 = bytes.fromhex(
    "011704000000040000000405000000070000000a0000000202010402000000785eab376560b053646"
    "0d8708b81c18c95818189898589eb8104038312039003c440909c987678a5e387f9331a1492a0d4db"
    "cdfb4192cc100540f0a31eca3800a13fec87d2ff01000615ac"
)


def test_a_payload_stored_by_earlier_klmon_still_reads() -> None:
    d = decode_sample(STORED_V1)
    assert d.prompt == "caf\u00e9" and d.response == "A\U0001f600 b"
    assert d.tokens == ["A", "\U0001f600", " b", "\udcff"]
    assert d.token_ids.tolist() == [5, 70000, 12, 0]
    assert d.policy_logprobs[[0, 1, 3]].tolist() == [-0.8, -0.4251, -2.0]
    assert math.isnan(d.policy_logprobs[2])
    assert d.ref_logprobs.tolist() == [-1.5, -0.5, -1.0, -np.inf]
