"""The stored form of a drill-down sample: one zlib-compressed blob (``samples.payload``)
holding the prompt, the response, the tokens and the two per-token log-prob arrays.

Why this shape: JSON strings and floats cost ~37 kB per 2048-token sequence; the same sample
here is a few kB (``benchmarks/bench_storage.py``). Encoding is numpy over whole arrays plus
one ``zlib.compress`` (which releases the GIL), never a Python loop per token: it runs on the
training process's writer thread.

Precision (the one tolerance the readers live with): each log-prob is kept to
``LOGPROB_DECIMALS`` decimals by *sum-preserving* rounding (the running sum is rounded, each
value is the difference of two rounded sums), so

- every decoded log-prob is within ``LOGPROB_TOLERANCE`` (1e-4 nats) of the logged float32,
  and values already on the grid (-0.8, -2.1) come back exactly;
- the sum of any prefix of a sequence's log p, log q and log p - log q is within 1e-4 nats
  of the sum of the logged values: the drill-down's "sum of token log-ratios" still matches
  the sequence KL, which is stored apart as a float64 column (``kl_seq``) computed from the
  full-precision arrays.

Non-finite values (an importer may pass them) are kept exactly, apart from the grid. Texts and
token strings are kept exactly (UTF-8, lone surrogates included).

Tokens are stored either as strings (lengths plus their concatenated text; when they
concatenate to the response, as is usual, only the lengths) or as integer token ids
(``token_ids``, resolved to strings by whoever owns the run's vocabulary), or both.

Layout: a fixed header (``_HEADER``: format version, flags, the log-prob count, the token
count, the decimals, the byte lengths of the texts, the integer widths) then one zlib stream
of byte-planes ("shuffled" integers: the high bytes of small numbers are all zero and
compress to nothing) and UTF-8 texts. The format version lets a later codec read old blobs.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.errors import InvalidInput

FORMAT_VERSION = 1
LOGPROB_DECIMALS = 4
LOGPROB_TOLERANCE = 10.0**-LOGPROB_DECIMALS
"""Largest difference between a decoded log-prob and the logged one (nats)."""
ZLIB_LEVEL = 3

# version, flags, n values, n tokens, decimals, prompt bytes, response bytes, token-text bytes,
# widths of: log p, log p - log q, token lengths, token ids; number of non-finite values
_HEADER = struct.Struct("<BBIIBIIIBBBBI")
_PROMPT, _RESPONSE, _TOKEN_STRINGS, _TOKENS_ARE_RESPONSE, _TOKEN_IDS = 1, 2, 4, 8, 16
_UTF8 = ("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class DecodedSample:
    """What a payload holds, as the readers use it."""

    prompt: str | None
    response: str | None
    tokens: list[str] | None
    token_ids: np.ndarray | None
    policy_logprobs: np.ndarray
    ref_logprobs: np.ndarray


def encode_sample(
    policy_logprobs: Any,
    ref_logprobs: Any,
    *,
    prompt: str | None = None,
    response: str | None = None,
    tokens: Sequence[str] | None = None,
    token_ids: Any = None,
) -> bytes:
    """The payload of one sample (see the module doc). InvalidInput names the field that
    cannot be stored (arrays of different lengths, token ids that are not integers >= 0)."""
    lp = _float_array(policy_logprobs, "policy_logprobs")
    ref = _float_array(ref_logprobs, "ref_logprobs")
    if lp.shape != ref.shape:
        raise InvalidInput(
            f"sample policy_logprobs ({lp.size} values) and ref_logprobs ({ref.size}) differ "
            "in length"
        )
    bad = ~(np.isfinite(lp) & np.isfinite(ref))
    n_bad = int(bad.sum())
    if n_bad:
        lp, ref = np.where(bad, 0.0, lp), np.where(bad, 0.0, ref)
    lp_q = _grid(lp)
    diff_q = lp_q - _grid(ref)  # lossless: log q comes back as lp_q - diff_q
    planes = [_shuffled(lp_q), _shuffled(diff_q)]
    flags = 0
    texts: list[bytes] = []
    prompt_b = b"" if prompt is None else prompt.encode(*_UTF8)
    response_b = b"" if response is None else response.encode(*_UTF8)
    flags |= (_PROMPT if prompt is not None else 0) | (_RESPONSE if response is not None else 0)
    len_plane, text_b, n_tok = (b"", 0), b"", 0
    if tokens is not None:
        toks = tokens if isinstance(tokens, list) else list(tokens)
        n_tok = len(toks)
        joined = "".join(toks)
        lengths = np.fromiter(map(len, toks), dtype=np.int64, count=n_tok)
        len_plane = _shuffled(lengths)
        flags |= _TOKEN_STRINGS
        if response is not None and joined == response:
            flags |= _TOKENS_ARE_RESPONSE
        else:
            text_b = joined.encode(*_UTF8)
    ids_plane: tuple[bytes, int] = (b"", 0)
    if token_ids is not None:
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or (ids.size and int(ids.min()) < 0):
            raise InvalidInput("sample token_ids must be a 1-d array of integers >= 0")
        if tokens is not None and ids.size != n_tok:
            raise InvalidInput(f"sample token_ids ({ids.size}) and tokens ({n_tok}) differ")
        n_tok = ids.size
        ids_plane = _shuffled(ids.astype(np.int64))
        flags |= _TOKEN_IDS
    texts = [prompt_b, response_b, text_b]
    header = _HEADER.pack(
        FORMAT_VERSION,
        flags,
        lp.size,
        n_tok,
        LOGPROB_DECIMALS,
        len(prompt_b),
        len(response_b),
        len(text_b),
        planes[0][1],
        planes[1][1],
        len_plane[1],
        ids_plane[1],
        n_bad,
    )
    parts = [planes[0][0], planes[1][0], len_plane[0], ids_plane[0], *texts]
    if n_bad:
        where = np.flatnonzero(bad).astype("<u4")
        parts += [
            where.tobytes(),
            np.asarray(policy_logprobs, dtype="<f8").reshape(-1)[where].tobytes(),
            np.asarray(ref_logprobs, dtype="<f8").reshape(-1)[where].tobytes(),
        ]
    return header + zlib.compress(b"".join(parts), ZLIB_LEVEL)


def decode_sample(payload: bytes) -> DecodedSample:
    """The sample a payload holds (see :func:`encode_sample`)."""
    head = bytes(payload[: _HEADER.size])
    if len(head) < _HEADER.size or head[0] != FORMAT_VERSION:
        raise InvalidInput(
            f"sample payload of format {head[:1].hex() or 'nothing'} is not one this klmon reads "
            f"(format {FORMAT_VERSION}): upgrade klmon"
        )
    (_, flags, n, n_tok, decimals, n_prompt, n_resp, n_text, w_lp, w_diff, w_len, w_ids, n_bad) = (
        _HEADER.unpack(head)
    )
    body = memoryview(zlib.decompress(bytes(payload[_HEADER.size :])))
    pos = 0

    def take(size: int) -> memoryview:
        nonlocal pos
        out = body[pos : pos + size]
        pos += size
        return out

    lp_q = _unshuffled(take(n * w_lp), w_lp, n)
    diff_q = _unshuffled(take(n * w_diff), w_diff, n)
    scale = 10.0**decimals
    lp = lp_q / scale
    ref = (lp_q - diff_q) / scale
    lengths = _unshuffled(take(n_tok * w_len), w_len, n_tok) if flags & _TOKEN_STRINGS else None
    ids = _unshuffled(take(n_tok * w_ids), w_ids, n_tok) if flags & _TOKEN_IDS else None
    prompt = bytes(take(n_prompt)).decode(*_UTF8) if flags & _PROMPT else None
    response = bytes(take(n_resp)).decode(*_UTF8) if flags & _RESPONSE else None
    text = bytes(take(n_text)).decode(*_UTF8)
    if n_bad:
        where = np.frombuffer(take(4 * n_bad), dtype="<u4")
        lp[where] = np.frombuffer(take(8 * n_bad), dtype="<f8")
        ref[where] = np.frombuffer(take(8 * n_bad), dtype="<f8")
    tokens = None
    if lengths is not None:
        source = (response or "") if flags & _TOKENS_ARE_RESPONSE else text
        ends = np.cumsum(lengths).tolist()
        starts = [0, *ends][:-1]
        tokens = [source[a:b] for a, b in zip(starts, ends, strict=True)]
    return DecodedSample(prompt, response, tokens, ids, lp, ref)


def _float_array(values: Any, field: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"sample {field} is not an array of numbers: {exc}") from None
    if arr.ndim != 1:
        raise InvalidInput(f"sample {field} must be 1-d, got shape {arr.shape}")
    return arr


def _grid(values: np.ndarray) -> np.ndarray:
    """Sum-preserving rounding to LOGPROB_DECIMALS: the differences of the rounded running
    sum (each value moves by less than one step, every prefix sum by at most half a step)."""
    sums = np.rint(np.cumsum(values) * 10.0**LOGPROB_DECIMALS)
    return np.diff(sums, prepend=0.0).astype(np.int64)


def _shuffled(values: np.ndarray) -> tuple[bytes, int]:
    """Zigzag integers in the narrowest width that holds them, as byte planes (all first
    bytes, then all second bytes, ...), and that width."""
    v = values.astype(np.int64, copy=False)
    z = ((v << 1) ^ (v >> 63)).view(np.uint64)
    top = int(z.max()) if z.size else 0
    width = 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4 if top < 1 << 32 else 8
    narrow = z.astype(f"<u{width}")
    return narrow.view(np.uint8).reshape(-1, width).T.tobytes(), width


def _unshuffled(planes: memoryview, width: int, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    raw = np.frombuffer(planes, dtype=np.uint8).reshape(width, n).T.copy()
    z = raw.view(f"<u{width}").reshape(n).astype(np.uint64)
    return ((z >> np.uint64(1)).astype(np.int64)) ^ -((z & np.uint64(1)).astype(np.int64))


__all__ = [
    "FORMAT_VERSION",
    "LOGPROB_DECIMALS",
    "LOGPROB_TOLERANCE",
    "DecodedSample",
    "decode_sample",
    "encode_sample",
]
