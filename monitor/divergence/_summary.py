"""A step's summary from the sufficient statistics of its shards: one formula for every
quantity, used by ``summarize`` (one shard) and ``merge_partials`` (several) alike."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.divergence._constants import N_BINS, SCALAR_FIELDS, TOP_FRACTION
from monitor.divergence.ledger import TokenLedger, merge_ledgers, vocab_top_share
from monitor.errors import InvalidInput

_QUANTILES = (0.05, 0.50, 0.95, 0.99)
_PARTIAL_FORMAT = "klmon.partials/1"


@dataclass(frozen=True)
class StepSummary:
    """The KL quantities of one step (docs/ARCHITECTURE.md). Scalars are floats, or None when their
    input was not given; ``seq_kl`` and ``token_hist`` are arrays (not part of :meth:`as_dict`).
    """

    kl_mean: float
    kl_std: float
    kl_min: float
    kl_p05: float
    kl_p50: float
    kl_p95: float
    kl_p99: float
    kl_max: float
    k1: float
    k2: float
    k3: float
    neg_kl_frac: float
    top1pct_share: float
    resp_len_mean: float
    policy_nll: float
    entropy_mean: float | None
    reward_mean: float | None
    reward_std: float | None
    kl_coef: float | None
    rollout_gap: float | None
    n_sequences: int
    n_tokens: int
    seq_kl: np.ndarray
    token_hist: np.ndarray
    vocab_top_share: float | None = None
    ledger: TokenLedger | None = None  # the whole step's, when token_ids were given

    def as_dict(self) -> dict[str, float | int | None]:
        """The scalar fields (the ``steps`` columns) as plain Python numbers."""
        return {name: getattr(self, name) for name in SCALAR_FIELDS}


# --------------------------------------------------------------------------------------------
# Sufficient statistics of one shard (one rank's part of a step)


@dataclass(frozen=True)
class Partial:
    """Mergeable statistics of a shard. Token-level sums are float64; ``seq_kl`` and
    ``rewards`` are kept whole (B is small) so quantiles and standard deviations stay exact."""

    n_tokens: int
    sum_l: float
    sum_half_l2: float
    sum_k3: float
    sum_nll: float
    sum_entropy: float | None
    sum_rollout_gap: float | None
    sum_pos_l: float
    top_pos_l: np.ndarray  # the top ceil(1% n_tokens) positive l_t of the shard
    seq_kl: np.ndarray
    token_hist: np.ndarray
    rewards: np.ndarray | None
    kl_coef: float | None
    ledger: TokenLedger | None = None  # the shard's whole token ledger (token_ids given)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ledger": None if self.ledger is None else self.ledger.to_dict(),
            "format": _PARTIAL_FORMAT,
            "n_sequences": len(self.seq_kl),
            "n_tokens": int(self.n_tokens),
            "sum_l": float(self.sum_l),
            "sum_half_l2": float(self.sum_half_l2),
            "sum_k3": float(self.sum_k3),
            "sum_nll": float(self.sum_nll),
            "sum_entropy": _opt_float(self.sum_entropy),
            "sum_rollout_gap": _opt_float(self.sum_rollout_gap),
            "sum_pos_l": float(self.sum_pos_l),
            "top_pos_l": np.sort(self.top_pos_l)[::-1].tolist(),
            "seq_kl": self.seq_kl.tolist(),
            "token_hist": self.token_hist.tolist(),
            "rewards": None if self.rewards is None else self.rewards.tolist(),
            "kl_coef": _opt_float(self.kl_coef),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> Partial:
        if d.get("format") != _PARTIAL_FORMAT:
            raise InvalidInput(
                f"{where} is not a klmon partial (format {d.get('format')!r}, "
                f"expected {_PARTIAL_FORMAT!r})"
            )
        try:
            seq_kl = np.asarray(d["seq_kl"], dtype=np.float64).reshape(-1)
            hist = np.asarray(d["token_hist"], dtype=np.int64).reshape(-1)
            rewards = d.get("rewards")
            ledger = d.get("ledger")
            part = cls(
                ledger=None if ledger is None else TokenLedger.from_dict(ledger, where),
                n_tokens=int(d["n_tokens"]),
                sum_l=float(d["sum_l"]),
                sum_half_l2=float(d["sum_half_l2"]),
                sum_k3=float(d["sum_k3"]),
                sum_nll=float(d["sum_nll"]),
                sum_entropy=_opt_float(d.get("sum_entropy")),
                sum_rollout_gap=_opt_float(d.get("sum_rollout_gap")),
                sum_pos_l=float(d["sum_pos_l"]),
                top_pos_l=np.asarray(d["top_pos_l"], dtype=np.float64).reshape(-1),
                seq_kl=seq_kl,
                token_hist=hist,
                rewards=None if rewards is None else np.asarray(rewards, dtype=np.float64),
                kl_coef=_opt_float(d.get("kl_coef")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{where} is malformed: {exc}") from None
        if len(hist) != N_BINS or len(seq_kl) != int(d.get("n_sequences", len(seq_kl))):
            raise InvalidInput(f"{where} is malformed: histogram or seq_kl has the wrong length")
        return part


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def finalize(parts: Sequence[Partial], kl_coef: float | None) -> StepSummary:
    seq_kl = _joined([p.seq_kl for p in parts])
    n_seq = len(seq_kl)
    n_tok = sum(p.n_tokens for p in parts)
    if n_seq == 0 or n_tok == 0:
        raise InvalidInput("the partials hold no sequences: a step needs at least one")
    q05, q50, q95, q99 = _quantiles(seq_kl, _QUANTILES)
    kl_mean, kl_std = _mean_std(seq_kl)
    rewards = _all_or_none([p.rewards for p in parts], "rewards")
    reward_mean, reward_std = (None, None) if rewards is None else _mean_std(_joined(rewards))
    if kl_coef is None:
        coefs = {p.kl_coef for p in parts if p.kl_coef is not None}
        kl_coef = coefs.pop() if len(coefs) == 1 else None
    entropy = _all_or_none([p.sum_entropy for p in parts], "entropies")
    gap = _all_or_none([p.sum_rollout_gap for p in parts], "rollout_logprobs")
    ledgers = _all_or_none([p.ledger for p in parts], "token_ids")
    ledger = None if ledgers is None else merge_ledgers(ledgers)
    hists = [p.token_hist for p in parts]
    return StepSummary(
        kl_mean=kl_mean,
        kl_std=kl_std,
        kl_min=float(seq_kl.min()),
        kl_p05=float(q05),
        kl_p50=float(q50),
        kl_p95=float(q95),
        kl_p99=float(q99),
        kl_max=float(seq_kl.max()),
        k1=sum(p.sum_l for p in parts) / n_tok,
        k2=sum(p.sum_half_l2 for p in parts) / n_tok,
        k3=max(0.0, sum(p.sum_k3 for p in parts) / n_tok),
        neg_kl_frac=float(np.count_nonzero(seq_kl < 0)) / n_seq,
        top1pct_share=_top_share(parts, n_tok),
        resp_len_mean=n_tok / n_seq,
        policy_nll=sum(p.sum_nll for p in parts) / n_tok,
        entropy_mean=None if entropy is None else sum(entropy) / n_tok,
        reward_mean=reward_mean,
        reward_std=reward_std,
        kl_coef=None if kl_coef is None else float(kl_coef),
        rollout_gap=None if gap is None else sum(gap) / n_tok,
        n_sequences=n_seq,
        n_tokens=n_tok,
        seq_kl=seq_kl,
        token_hist=hists[0] if len(hists) == 1 else np.sum(hists, axis=0, dtype=np.int64),
        vocab_top_share=None if ledger is None else vocab_top_share(ledger),
        ledger=ledger,
    )


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays end to end (one array as it is: a summary of one shard copies nothing)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    """np.mean(x) and np.std(x) of a 1-D float64 array, bit for bit (the same pairwise sums
    and divisions), in four numpy calls instead of some twenty."""
    mean = np.add.reduce(x) / len(x)
    d = x - mean
    return float(mean), math.sqrt(np.add.reduce(d * d) / len(x))


def _quantiles(x: np.ndarray, qs: Sequence[float]) -> list[float]:
    """np.quantile's default ('linear') method, without its per-call overhead (a tenth of a
    millisecond, as long as the whole token pass of a small step): the same float64
    operations, on Python floats."""
    s = np.sort(x).tolist()
    last = len(s) - 1
    out = []
    for q in qs:
        h = last * q
        lo = math.floor(h)
        hi = min(lo + 1, last)
        out.append(s[lo] + (h - lo) * (s[hi] - s[lo]))
    return out


def _all_or_none(values: list[Any], name: str) -> list[Any] | None:
    given = [v is not None for v in values]
    if all(given):
        return values
    if any(given):
        raise InvalidInput(f"{name} were given for some shards and not for others")
    return None


def _top_share(parts: Sequence[Partial], n_tokens: int) -> float:
    """Share of the sum of positive l_t carried by the top ceil(1% n_tokens) tokens."""
    pos_sum = sum(p.sum_pos_l for p in parts)
    if pos_sum <= 0.0:
        return 0.0
    k = math.ceil(TOP_FRACTION * n_tokens)
    top = _joined([p.top_pos_l for p in parts])
    if len(top) > k:
        top = np.partition(top, len(top) - k)[len(top) - k :]
    return min(1.0, float(np.sum(top, dtype=np.float64)) / pos_sum)
