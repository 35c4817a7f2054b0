"""The stored form of a drill-down sample: one compressed blob (``samples.payload``) holding
the prompt, the response, the tokens and the two per-token log-prob arrays.

Why this shape: JSON strings and floats cost ~37 kB per 2048-token sequence; the same sample
here is a few kB (``benchmarks/bench_storage.py``). Encoding runs on the training process's
background writer (its processor thread encodes each picked sample once), so it is never a
Python loop per token: the per-value work (grid rounding, zigzag, byte planes, token lengths)
is one call of the ``monitor/_codec.c`` extension with the GIL released, or, in builds
without a C compiler, numpy over whole arrays (``_numpy_planes``, the definition: same
bytes); then two zstd calls at level 1, one for the numbers and one for the texts: one
stream for both shares one literal table between byte planes and UTF-8, and negative (faster)
levels code no literals at all, which costs texts ~40% and a whole sample ~20% more bytes
for ~15 µs less CPU.

Precision (the one tolerance the readers live with): each log-prob is kept to
``LOGPROB_DECIMALS`` decimals by *sum-preserving* rounding (the running sum is rounded, each
value is the difference of two rounded sums), so

- every decoded log-prob is within ``LOGPROB_TOLERANCE`` (1e-4 nats) of the logged float32,
  and values already on the grid (-0.8, -2.1) come back exactly;
- the sum of any prefix of a sequence's log p, log q and log p - log q is within 1e-4 nats
  of the sum of the logged values: the drill-down's "sum of token log-ratios" still matches
  the sequence KL, which is stored apart as a float64 column (``kl_seq``) computed from the
  full-precision arrays.

Non-finite values (an importer may pass them) and values beyond ``GRID_LIMIT`` are kept
exactly, apart from the grid. Texts and token strings are kept exactly (UTF-8, lone
surrogates included).

Tokens are stored either as strings (lengths plus their concatenated text; when they
concatenate to the response, as is usual, only the lengths) or as integer token ids
(``token_ids``, resolved to strings by whoever owns the run's vocabulary), or both.

Layout: a fixed header (``_HEADER``: format version, flags, the log-prob count, the token
count, the decimals, the byte lengths of the texts, the integer widths, the non-finite count)
then, in format 3, the byte length of the first zstd frame (``_FRAME``), that frame (the
byte-planes, "shuffled" integers: the high bytes of small numbers are all zero and compress
to nothing, then the values kept apart from the grid) and a second frame (the UTF-8 texts;
none when there are no texts).
Format 1 (zlib), written by earlier klmon and still read, holds the same parts in one
stream: planes, token ids, texts, then the values kept apart. (Format 2, one zstd stream,
never left development.)
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from monitor.errors import InvalidInput

try:
    from monitor._codec import planes as _compiled_planes
except ImportError:  # built without a C compiler: numpy writes the same bytes
    _compiled_planes = None

FORMAT_VERSION = 3
READ_VERSIONS = (1, 3)
"""Formats :func:`decode_sample` reads: 1 (zlib, written by earlier klmon) and 3."""
LOGPROB_DECIMALS = 4
LOGPROB_TOLERANCE = 10.0**-LOGPROB_DECIMALS
"""Largest difference between a decoded log-prob and the logged one (nats)."""
GRID_LIMIT = 1e5
"""A log-prob beyond +-GRID_LIMIT nats (no model's) is kept exactly, like a non-finite one:
the grid's integers stay far from int64's limits however long the sequence."""
ZSTD_LEVEL = 1
_SCALE = 10.0**LOGPROB_DECIMALS
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

# version, flags, n values, n tokens, decimals, prompt bytes, response bytes, token-text bytes,
# widths of: log p, log p - log q, token lengths, token ids; number of non-finite values
_HEADER = struct.Struct("<BBIIBIIIBBBBI")
_FRAME = struct.Struct("<I")  # format 3: the compressed length of the numbers' frame
_PROMPT, _RESPONSE, _TOKEN_STRINGS, _TOKENS_ARE_RESPONSE, _TOKEN_IDS = 1, 2, 4, 8, 16
_UTF8 = ("utf-8", "surrogatepass")
_ZSTD = threading.local()  # a compressor per thread (one must not be shared between threads)


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
    joined_tokens: str | None = None,
) -> bytes:
    """The payload of one sample (see the module doc). InvalidInput names the field that
    cannot be stored (arrays of different lengths, token ids that are not integers >= 0).
    ``joined_tokens``: ``"".join(tokens)`` where the caller has it already (the processor
    has, from cleaning the tokens), so it is not joined twice; the same bytes either way."""
    lp = _float_array(policy_logprobs, "policy_logprobs")
    ref = _float_array(ref_logprobs, "ref_logprobs")
    if lp.shape != ref.shape:
        raise InvalidInput(
            f"sample policy_logprobs ({lp.size} values) and ref_logprobs ({ref.size}) differ "
            "in length"
        )
    toks = None if tokens is None else tokens if isinstance(tokens, list) else list(tokens)
    flags = (_PROMPT if prompt is not None else 0) | (_RESPONSE if response is not None else 0)
    text_b, n_tok = b"", 0
    if toks is not None:
        n_tok = len(toks)
        # TypeError for a token that is not a str
        joined = "".join(toks) if joined_tokens is None else joined_tokens
        flags |= _TOKEN_STRINGS
        if response is not None and joined == response:
            flags |= _TOKENS_ARE_RESPONSE
        else:
            text_b = joined.encode(*_UTF8)
    planes, w_lp, w_diff, w_len, n_bad = _planes(lp, ref, toks, _SCALE, GRID_LIMIT)
    ids_plane: tuple[bytes, int] = (b"", 0)
    if token_ids is not None:
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or (ids.size and int(ids.min()) < 0):
            raise InvalidInput("sample token_ids must be a 1-d array of integers >= 0")
        if toks is not None and ids.size != n_tok:
            raise InvalidInput(f"sample token_ids ({ids.size}) and tokens ({n_tok}) differ")
        n_tok = ids.size
        ids_plane = _shuffled(ids.astype(np.int64))
        flags |= _TOKEN_IDS
    prompt_b = b"" if prompt is None else prompt.encode(*_UTF8)
    response_b = b"" if response is None else response.encode(*_UTF8)
    header = _HEADER.pack(
        FORMAT_VERSION,
        flags,
        lp.size,
        n_tok,
        LOGPROB_DECIMALS,
        len(prompt_b),
        len(response_b),
        len(text_b),
        w_lp,
        w_diff,
        w_len,
        ids_plane[1],
        n_bad,
    )
    numbers = [planes, ids_plane[0]]
    if n_bad:
        where = np.flatnonzero(~(_on_grid(lp) & _on_grid(ref))).astype("<u4")
        numbers += [where.tobytes(), lp[where].astype("<f8").tobytes()]
        numbers.append(ref[where].astype("<f8").tobytes())
    zstd = _compressor()
    packed_numbers = zstd.compress(b"".join(numbers))
    texts = b"".join((prompt_b, response_b, text_b))
    packed_texts = zstd.compress(texts) if texts else b""  # no texts: no frame
    return b"".join((header, _FRAME.pack(len(packed_numbers)), packed_numbers, packed_texts))


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_ZSTD, "compressor", None)
    if c is None:
        c = _ZSTD.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def decode_sample(payload: bytes) -> DecodedSample:
    """The sample a payload holds (see :func:`encode_sample`)."""
    head = bytes(payload[: _HEADER.size])
    if len(head) < _HEADER.size or head[0] not in READ_VERSIONS:
        raise InvalidInput(
            f"sample payload of format {head[:1].hex() or 'nothing'} is not one this klmon reads "
            f"(formats {', '.join(map(str, READ_VERSIONS))}): upgrade klmon"
        )
    (_, flags, n, n_tok, decimals, n_prompt, n_resp, n_text, w_lp, w_diff, w_len, w_ids, n_bad) = (
        _HEADER.unpack(head)
    )
    numbers, texts = _streams(head[0], bytes(payload[_HEADER.size :]))
    take = numbers.take
    lp_q = _unshuffled(take(n * w_lp), w_lp, n)
    diff_q = _unshuffled(take(n * w_diff), w_diff, n)
    scale = 10.0**decimals
    lp = lp_q / scale
    ref = (lp_q - diff_q) / scale
    lengths = _unshuffled(take(n_tok * w_len), w_len, n_tok) if flags & _TOKEN_STRINGS else None
    ids = _unshuffled(take(n_tok * w_ids), w_ids, n_tok) if flags & _TOKEN_IDS else None
    prompt = bytes(texts.take(n_prompt)).decode(*_UTF8) if flags & _PROMPT else None
    response = bytes(texts.take(n_resp)).decode(*_UTF8) if flags & _RESPONSE else None
    text = bytes(texts.take(n_text)).decode(*_UTF8)
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


class _Stream:
    """A decompressed stream read front to back."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = memoryview(data), 0

    def take(self, size: int) -> memoryview:
        out = self._data[self._pos : self._pos + size]
        self._pos += size
        return out


def _streams(version: int, packed: bytes) -> tuple[_Stream, _Stream]:
    """The numbers' and the texts' streams of a payload body. Format 1 holds both in one
    stream, in the order :func:`decode_sample` reads them (planes, ids, texts, the values
    kept apart), so the two are one reader there."""
    if version == 1:
        one = _Stream(zlib.decompress(packed))
        return one, one
    unpack = zstandard.ZstdDecompressor().decompress
    (size,) = _FRAME.unpack_from(packed)
    start = _FRAME.size
    texts = packed[start + size :]
    return _Stream(unpack(packed[start : start + size])), _Stream(unpack(texts) if texts else b"")


def _float_array(values: Any, field: str) -> np.ndarray:
    """values as a contiguous 1-d float32 (kept as is: no widening copy) or float64 array."""
    if not (isinstance(values, np.ndarray) and values.dtype in _FLOATS):
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"sample {field} is not an array of numbers: {exc}") from None
    if values.ndim != 1:
        raise InvalidInput(f"sample {field} must be 1-d, got shape {values.shape}")
    return np.ascontiguousarray(values)


def _on_grid(values: np.ndarray) -> np.ndarray:
    """Where a value goes on the grid: finite and within GRID_LIMIT (NaN compares False)."""
    return np.abs(values) <= GRID_LIMIT


def _numpy_planes(
    lp: np.ndarray, ref: np.ndarray, tokens: list[str] | None, scale: float, limit: float
) -> tuple[bytes, int, int, int, int]:
    """The byte planes of log p on the grid, of (grid log p - grid log q) and of the token
    lengths, their widths (0 for the lengths without tokens) and the number of values kept
    apart (not finite or beyond ``limit`` in either array; 0 on the grid). The definition
    of ``monitor/_codec.c``'s ``planes``, which returns the same bytes in one pass."""
    lp, ref = lp.astype(np.float64, copy=False), ref.astype(np.float64, copy=False)
    good = (np.abs(lp) <= limit) & (np.abs(ref) <= limit)
    n_bad = int(lp.size - np.count_nonzero(good))
    if n_bad:
        lp, ref = np.where(good, lp, 0.0), np.where(good, ref, 0.0)
    lp_q = _grid(lp, scale)
    lp_plane, w_lp = _shuffled(lp_q)
    diff_plane, w_diff = _shuffled(lp_q - _grid(ref, scale))  # log q = lp_q - diff_q
    len_plane, w_len = b"", 0
    if tokens is not None:
        len_plane, w_len = _shuffled(np.fromiter(map(len, tokens), np.int64, len(tokens)))
    return lp_plane + diff_plane + len_plane, w_lp, w_diff, w_len, n_bad


def _grid(values: np.ndarray, scale: float) -> np.ndarray:
    """Sum-preserving rounding to 1/scale: the differences of the rounded running sum (each
    value moves by less than one step, every prefix sum by at most half a step)."""
    sums = np.rint(np.cumsum(values) * scale)
    return np.diff(sums, prepend=0.0).astype(np.int64)


_planes = _compiled_planes or _numpy_planes


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
