"""The per-step token ledger: for every token id of a step's masked tokens, how often it was
emitted and the sum of its ``l_t = log p - log q`` (the "drift vocabulary").

A :class:`TokenLedger` holds the full sparse ledger of a batch (every distinct id), so two
ledgers add exactly (:func:`merge_ledgers`: micro-batches, ranks). What a step stores is its
:func:`top_rows`: the ``k`` ids with the largest positive sums and the ``k`` with the most
negative ones, plus the step's positive and negative mass, so shares stay exact:

- ``pos_mass = sum over ids of max(lr_sum_id, 0)``, ``neg_mass = sum over ids of
  min(lr_sum_id, 0)`` (<= 0): the mass of the *net* per-id sums, so an id's share of it is
  ``lr_sum_id / pos_mass`` whatever the other ids.
- ``vocab_top_share`` (:func:`vocab_top_share`): the share of ``pos_mass`` carried by the
  :data:`VOCAB_TOP_N` ids with the largest positive sums (0 when ``pos_mass`` is 0).

Counting (:func:`token_ledger`, the reference): a weighted ``np.bincount`` over the masked
ids when the largest id is below :data:`BINCOUNT_MAX_ID` (every real vocabulary), else
``np.unique`` on the masked ids. Where the C kernel was built, ``summarize`` counts with its
scatter-add instead (``monitor/divergence/_compiled.py``: one read of the ids and log-probs,
about the cost of the summary's own pass), for ids below the same bound
(``benchmarks/bench_divergence.py`` measures the three).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.errors import InvalidInput

#: Default number of ids a step keeps on each side (largest positive, most negative sums).
LEDGER_K = 32
#: The largest K a run may ask for: a step stores at most 2 K ledger rows.
LEDGER_K_MAX = 1024
#: vocab_top_share is the share of the positive mass carried by this many ids.
VOCAB_TOP_N = 5
#: Below this largest id the ledger counts with a dense bincount (8 MiB per pass at 2**20).
BINCOUNT_MAX_ID = 2**22


@dataclass(frozen=True)
class TokenLedger:
    """Every distinct id of a batch: ``ids`` (int64, ascending), ``counts`` (int64) and
    ``lr_sums`` (float64, the sum of l_t over the id's masked tokens)."""

    ids: np.ndarray
    counts: np.ndarray
    lr_sums: np.ndarray

    @property
    def pos_mass(self) -> float:
        return float(np.sum(np.maximum(self.lr_sums, 0.0)))

    @property
    def neg_mass(self) -> float:
        return float(np.sum(np.minimum(self.lr_sums, 0.0)))

    def to_dict(self) -> dict[str, list[Any]]:
        """JSON-able (a shard's partial carries its rank's whole ledger)."""
        return {
            "ids": self.ids.tolist(),
            "counts": self.counts.tolist(),
            "sums": self.lr_sums.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> TokenLedger:
        try:
            ids = np.asarray(d["ids"], dtype=np.int64).reshape(-1)
            counts = np.asarray(d["counts"], dtype=np.int64).reshape(-1)
            sums = np.asarray(d["sums"], dtype=np.float64).reshape(-1)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{where} has a malformed token ledger: {exc}") from None
        if not len(ids) == len(counts) == len(sums):
            raise InvalidInput(f"{where} has a malformed token ledger: lengths differ")
        return cls(ids, counts, sums)


@dataclass(frozen=True)
class LedgerTop:
    """What a step stores: the rows of the top ``k`` ids by positive and by negative sum
    (an id in both lists once; ascending id), and the masses of the whole ledger."""

    ids: np.ndarray
    counts: np.ndarray
    lr_sums: np.ndarray
    pos_mass: float
    neg_mass: float

    def as_record(self, n_tokens: int) -> dict[str, Any]:
        """The JSON form a step record carries to the store (live, merged ranks, imports):
        ``ids``/``counts``/``sums`` lists, ``pos``/``neg`` masses, ``n`` the step's tokens."""
        return {
            "ids": self.ids.tolist(),
            "counts": self.counts.tolist(),
            "sums": self.lr_sums.tolist(),
            "pos": self.pos_mass,
            "neg": self.neg_mass,
            "n": n_tokens,
        }


def token_ledger(
    token_ids: np.ndarray, policy: np.ndarray, ref: np.ndarray, mask: np.ndarray | None
) -> TokenLedger:
    """The ledger of (B, T) int64 ``token_ids`` (checked by ``inputs.check_token_ids``) with
    the log-probs they were sampled with (same shape) under ``mask`` (None: every position).
    ``l_t`` is taken in float64 after masking, like the compiled pass."""
    if mask is None:
        ids = token_ids.reshape(-1)
        lr = policy.reshape(-1).astype(np.float64) - ref.reshape(-1)
    else:
        ids = token_ids[mask]
        lr = policy[mask].astype(np.float64) - ref[mask]
    if ids.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return TokenLedger(empty, empty, np.zeros(0, dtype=np.float64))
    if int(ids.max()) < BINCOUNT_MAX_ID:
        counts = np.bincount(ids)
        sums = np.bincount(ids, weights=lr, minlength=len(counts))
        present = np.flatnonzero(counts)
        return TokenLedger(present.astype(np.int64), counts[present], sums[present])
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=lr, minlength=len(uniq))
    return TokenLedger(uniq.astype(np.int64), counts.astype(np.int64), sums)


def merge_ledgers(ledgers: Sequence[TokenLedger]) -> TokenLedger:
    """The exact sum of ledgers (counts and sums per id)."""
    if len(ledgers) == 1:
        return ledgers[0]
    ids = np.concatenate([x.ids for x in ledgers])
    uniq, inverse = np.unique(ids, return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate([x.counts for x in ledgers]))
    sums = np.bincount(inverse, weights=np.concatenate([x.lr_sums for x in ledgers]))
    return TokenLedger(uniq.astype(np.int64), counts.astype(np.int64), sums)


def top_rows(ledger: TokenLedger, k: int = LEDGER_K) -> LedgerTop:
    """The top ``k`` ids by positive sum and the top ``k`` by negative sum (ties: the
    smaller id first), with the ledger's masses. At most ``2 k`` rows."""
    s = ledger.lr_sums
    order = np.lexsort((ledger.ids, -s))  # descending sum, then ascending id
    pos = order[:k][s[order[:k]] > 0]
    neg_order = np.lexsort((ledger.ids, s))
    neg = neg_order[:k][s[neg_order[:k]] < 0]
    keep = np.union1d(pos, neg).astype(np.intp)
    return LedgerTop(
        ids=ledger.ids[keep],
        counts=ledger.counts[keep],
        lr_sums=s[keep],
        pos_mass=ledger.pos_mass,
        neg_mass=ledger.neg_mass,
    )


def vocab_top_share(ledger: TokenLedger, n: int = VOCAB_TOP_N) -> float:
    """Share of the ledger's ``pos_mass`` carried by the ``n`` ids with the largest positive
    sums; 0 when no id has a positive sum."""
    pos = np.maximum(ledger.lr_sums, 0.0)
    total = float(np.sum(pos))
    if total <= 0.0:
        return 0.0
    top = np.partition(pos, len(pos) - n)[len(pos) - n :] if len(pos) > n else pos
    return min(1.0, float(np.sum(top)) / total)
