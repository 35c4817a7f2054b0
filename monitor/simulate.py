"""Simulated training runs with known failures, for tests, benchmarks and the demo.

Each step samples a small batch of responses from a categorical policy over a tiny
vocabulary whose logits drift away from a frozen reference; the per-step summary comes
from ``monitor.divergence.summarize`` exactly as for a real trainer. A healthy run's KL
rises from 0 to a plateau (the drift saturates) with sampling noise and a slow wander;
each failure kind in ``SCENARIOS`` perturbs the policy, the reference, the rollout
engine, the lengths, the rewards or the logging from a known onset step.

Sampled tokens are ids into ``VOCAB`` (words, a newline, '!!' and a special token), so
``summarize`` gets ``token_ids`` and every run has a token ledger (``vocab_top_share``);
the reward-hacking policy's drift past the onset goes into repeating ``HACK_TOKENS``
('help', with '!!' following it), what the drift vocabulary panel and the
``vocabulary_concentration`` detector show.

``scale='sequence'`` puts the per-sequence KL (``kl_mean``) near 14 nats, like a PPO
run; ``scale='token'`` puts the per-token KL near 0.02 nats (``k3`` like GRPO's ``kl``;
``kl_mean`` is then ~0.8 and noisy). ``grpo_view`` turns a run into what a GRPO import
holds: ``k3`` and no per-sequence KL.

Example::

    run = simulate_run("spike", steps=600, seed=1, onset=400)
    run.steps_df  # the step table detectors read
    for batch in iter_batches("healthy", steps=10, seed=0): ...  # raw batches to log
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pandas as pd

from monitor.analytics.findings import RunContext
from monitor.divergence import summarize
from monitor.errors import InvalidInput

__all__ = [
    "SCENARIOS",
    "Batch",
    "SimulatedRun",
    "grpo_view",
    "iter_batches",
    "simulate_run",
]

Scale = Literal["sequence", "token"]

#: Failure kinds (each named after the detector that should catch it), and "healthy".
SCENARIOS: tuple[str, ...] = (
    "healthy",
    "budget",
    "spike",
    "shift",
    "negative_kl",
    "entropy_collapse",
    "reward_hacking",
    "length_drift",
    "concentration",
    "rollout_gap",
    "reference_offset",
    "stalled",
    "rejected_input",
)

VOCAB: tuple[str, ...] = (
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "be",
    "by",
    "this",
    "are",
    "or",
    "at",
    "from",
    "not",
    "but",
    "have",
    "we",
    "can",
    "you",
    "all",
    "one",
    "they",
    "will",
    "more",
    "if",
    "so",
    "has",
    "about",
    "which",
    "been",
    "up",
    "out",
    "no",
    "do",
    "any",
    "how",
    "our",
    "\n",
    "may",
    "its",
    "new",
    "only",
    "some",
    "what",
    "when",
    "good",
    "day",
    "very",
    "well",
    "thank",
    "please",
    "sure",
    "help",
    "answer",
    "!!",
    "<|secret|>",
)
N_VOCAB = len(VOCAB)
BATCH = 16
MAX_LEN = 64
LEN_MEAN = 40.0
WARMUP_STEPS = 60.0
STEP_SECONDS = 30.0
START_TIME = 1_700_000_000.0
#: Per-token KL(policy || reference) the drift saturates at, per scale.
PLATEAU_TOKEN_KL: dict[str, float] = {"sequence": 0.35, "token": 0.02}
#: The config's target_kl sits this far above the healthy plateau (a controller's margin).
TARGET_MARGIN = 1.25
#: The carrier token of the concentration scenario; the reference almost never emits it.
CARRIER = N_VOCAB - 1
#: The tokens a reward-hacking policy learns to repeat (a reward model that likes eager,
#: exclamatory help): its drift past the onset goes into the first, and the second follows
#: it at about a third of its frequency.
HACK_TOKENS: tuple[int, int] = (VOCAB.index("help"), VOCAB.index("!!"))


@dataclass(frozen=True)
class Batch:
    """One step's raw data, as a trainer would hand it to the ingestion client.

    Arrays are (sequences, tokens) with ``mask`` marking response tokens; log-probs are
    NaN-free except in the ``rejected_input`` scenario, which is the point of it.
    """

    step: int
    wall_time: float
    token_ids: np.ndarray
    mask: np.ndarray
    policy_logprobs: np.ndarray
    ref_logprobs: np.ndarray
    rollout_logprobs: np.ndarray
    entropies: np.ndarray
    rewards: np.ndarray
    kl_coef: float
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> list[list[str]]:
        """Token strings of each response (masked positions left out)."""
        return [
            [VOCAB[t] for t, keep in zip(row, keep_row, strict=True) if keep]
            for row, keep_row in zip(self.token_ids, self.mask, strict=True)
        ]

    @property
    def texts(self) -> list[str]:
        return [" ".join(words) for words in self.tokens]


@dataclass(frozen=True)
class SimulatedRun:
    """A simulated run: its step table, config and what really happened when.

    ``onset`` is the first step at which the failure is present (for ``budget``, the
    first step whose expected KL is above the budget; for ``reference_offset``, 0; for
    ``stalled``, the last logged step); None for a healthy run.
    """

    kind: str
    scale: Scale
    seed: int
    onset: int | None
    steps_df: pd.DataFrame
    config: dict[str, Any]
    status: str
    last_seen_at: float

    @property
    def step_seconds(self) -> float:
        """Median seconds between logged steps."""
        return float(np.median(np.diff(self.steps_df["wall_time"].to_numpy())))

    def context(self, now: float | None = None) -> RunContext:
        """The run context detectors take; ``now`` defaults to one step after the last."""
        when = self.last_seen_at + self.step_seconds if now is None else now
        return RunContext(self.config, self.status, self.last_seen_at, when)


def simulate_run(
    kind: str = "healthy",
    steps: int = 2000,
    seed: int = 0,
    onset: int | None = None,
    scale: Scale = "sequence",
) -> SimulatedRun:
    """Simulate ``steps`` steps of a run with failure ``kind`` from step ``onset``.

    ``onset`` defaults to half the run (ignored by ``healthy`` and ``reference_offset``).
    The same seed gives the same run, and the same healthy steps before the onset for
    every kind.
    """
    sim = _Simulation(kind, steps, seed, onset, scale)
    df = pd.DataFrame([sim.summary_row(batch) for batch in sim.batches()])
    df["step"] = df["step"].astype(np.int64)
    return SimulatedRun(
        kind=kind,
        scale=scale,
        seed=seed,
        onset=sim.true_onset(df),
        steps_df=df,
        config=sim.config,
        status="running",
        last_seen_at=float(df["wall_time"].iloc[-1]),
    )


def iter_batches(
    kind: str = "healthy",
    steps: int = 2000,
    seed: int = 0,
    onset: int | None = None,
    scale: Scale = "sequence",
) -> Iterator[Batch]:
    """The raw per-step batches of ``simulate_run`` with the same arguments."""
    return _Simulation(kind, steps, seed, onset, scale).batches()


def grpo_view(run: SimulatedRun) -> SimulatedRun:
    """The run as a GRPO import would show it: ``k3`` (per token) and no per-sequence KL,
    k1/k2, sign, concentration or token-ledger columns; the config gains ``target_kl_per_token``.
    """
    df = run.steps_df.copy()
    drop = [c for c in df.columns if c.startswith("kl_") and c != "kl_coef"]
    df[[*drop, "k1", "k2", "neg_kl_frac", "top1pct_share", "vocab_top_share"]] = np.nan
    config = {**run.config, "target_kl_per_token": run.config["target_kl"] / LEN_MEAN}
    return replace(run, steps_df=df, config=config)


def _softmax_log(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - math.log(np.exp(shifted).sum())


def _kl(logp: np.ndarray, logq: np.ndarray) -> float:
    return float(np.sum(np.exp(logp) * (logp - logq)))


def _solve(f: Callable[[float], float], target: float, lo: float = 0.0, hi: float = 50.0) -> float:
    """x in [lo, hi] with f(x) = target for an increasing f (bisection)."""
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


class _Simulation:
    """The generative model; one instance per run."""

    def __init__(self, kind: str, steps: int, seed: int, onset: int | None, scale: Scale):
        if kind not in SCENARIOS:
            raise InvalidInput(f"unknown scenario {kind!r}; choose one of {', '.join(SCENARIOS)}")
        if scale not in PLATEAU_TOKEN_KL:
            raise InvalidInput(f"scale must be 'sequence' or 'token', not {scale!r}")
        self.kind, self.steps, self.scale = kind, steps, scale
        if kind == "healthy":
            onset = None
        elif kind == "reference_offset":
            onset = 0
        elif onset is None:
            onset = steps // 2
        self.onset = onset
        structure = np.random.default_rng([seed, 0])
        self.rng = np.random.default_rng([seed, 1])
        self.z_ref = structure.normal(0.0, 1.5, N_VOCAB)
        self.plateau_kl = PLATEAU_TOKEN_KL[scale]
        # The reference rarely emits the carrier token: at 1% under the policy, its
        # log-ratio then carries 70% of the plateau's per-token KL.
        rest = np.delete(self.z_ref, CARRIER)
        log_rest = math.log(np.exp(rest - rest.max()).sum()) + rest.max()
        self.z_ref[CARRIER] = log_rest + math.log(0.01) - 0.7 * self.plateau_kl / 0.01
        self.direction = structure.normal(0.0, 1.0, N_VOCAB)
        self.direction[CARRIER] = 0.0
        self.other = structure.normal(0.0, 1.0, N_VOCAB)
        self.other[CARRIER] = 0.0
        # The reward-hacking drift: the healthy direction with the first hack token far on
        # top of it, so that the drift past the onset goes mostly into that token.
        self.hack_direction = self.direction.copy()
        self.hack_direction[HACK_TOKENS[0]] = float(self.direction.max()) + 3.0
        self.magnitude = _solve(lambda m: self._token_kl(m), self.plateau_kl)
        self.alpha = 1.5 / math.sqrt(self.plateau_kl * LEN_MEAN)
        self.config = {
            "scenario": kind,
            "scale": scale,
            "seed": seed,
            "kl_coef": 0.05 if scale == "sequence" else 0.04,
            "target_kl": float(f"{TARGET_MARGIN * self.plateau_kl * LEN_MEAN:.2g}"),
            "max_response_length": MAX_LEN,
        }
        self.ref_logits = self.z_ref
        if kind == "reference_offset":
            start = _softmax_log(self.z_ref)
            size = _solve(
                lambda c: _kl(start, _softmax_log(self.z_ref + c * self.other)), self.plateau_kl
            )
            self.ref_logits = self.z_ref + size * self.other
        plateau = self.z_ref + self.magnitude * self.direction
        lp = _softmax_log(plateau)
        # The trainer's log-probs use a temperature the sampler did not: k1 goes to about
        # minus half the plateau.
        self.mismatch_t = _solve(
            lambda t: _kl(lp, _softmax_log(plateau / t)), 1.5 * self.plateau_kl, 1.0, 20.0
        )
        # The rollout engine's distribution is this far off the trainer's (a quarter of
        # the plateau's per-token KL).
        self.rollout_shift = _solve(
            lambda c: _kl(_softmax_log(plateau + c * self.other), lp), 0.25 * self.plateau_kl
        )
        self.expected_kl: list[float] = []

    def _token_kl(self, m: float) -> float:
        return _kl(_softmax_log(self.z_ref + m * self.direction), _softmax_log(self.z_ref))

    def batches(self) -> Iterator[Batch]:
        """One batch per step; a stalled run logs nothing after its onset."""
        wander = 0.0
        wall = START_TIME
        last = self.steps if self.kind != "stalled" else min(self.steps, self.onset + 1)
        for step in range(last):
            wander = 0.99 * wander + self.rng.normal(0.0, 0.03 * math.sqrt(1 - 0.99**2))
            wall += STEP_SECONDS * self.rng.gamma(50.0, 1 / 50.0)
            uniforms = self.rng.random((BATCH, MAX_LEN))
            len_noise = self.rng.normal(0.0, 6.0, BATCH)
            reward_noise = self.rng.normal(0.0, 0.8, BATCH)
            rollout_noise = self.rng.normal(0.0, 0.01, (BATCH, MAX_LEN))
            yield self._batch(step, wall, wander, uniforms, len_noise, reward_noise, rollout_noise)

    def _batch(
        self,
        step: int,
        wall: float,
        wander: float,
        uniforms: np.ndarray,
        len_noise: np.ndarray,
        reward_noise: np.ndarray,
        rollout_noise: np.ndarray,
    ) -> Batch:
        kind = self.kind
        since = -1 if self.onset is None else step - self.onset
        active = since >= 0
        healthy_m = self.magnitude * (1 - math.exp(-step / WARMUP_STEPS)) * (1 + wander)
        m = healthy_m
        if active and kind == "spike" and since == 0:
            m *= 2.2
        elif active and kind == "budget":
            m *= 1 + since / 15
        elif active and kind == "shift":
            m *= 1 + 0.5 * min(1.0, since / 5)
        elif active and kind == "reward_hacking":
            m *= 1 + since / 20
        elif active and kind == "concentration":
            m *= 1 - 0.7 * min(1.0, since / 10)
        policy = self.z_ref + m * self.direction
        if active and kind == "reward_hacking":
            policy = self.z_ref + healthy_m * self.direction + (m - healthy_m) * self.hack_direction
            # '!!' follows 'help' at e^-1 of its odds, so that neither becomes certain (a
            # certain token leaves the rollout engine's noise above log p = 0)
            help_, bang = HACK_TOKENS
            policy[bang] = max(policy[bang], policy[help_] - 1.0)
        if active and kind == "entropy_collapse":
            policy = policy.copy()
            policy[np.argmax(policy)] += 8.0 * min(1.0, since / 30)
        if active and kind == "concentration":
            policy = policy.copy()
            policy[CARRIER] = self._carrier_logit(policy, min(1.0, since / 10))
        logp = _softmax_log(policy)
        logq = _softmax_log(self.ref_logits)
        rollout = policy
        if active and kind == "rollout_gap":
            rollout = policy + self.rollout_shift * min(1.0, since / 20) * self.other
        log_roll = _softmax_log(rollout)
        train_logp = logp
        if active and kind == "negative_kl":
            train_logp = _softmax_log(policy / self.mismatch_t)

        cdf = np.cumsum(np.exp(log_roll))
        ids = np.minimum(np.searchsorted(cdf / cdf[-1], uniforms), N_VOCAB - 1)
        len_mean = LEN_MEAN
        if active and kind == "length_drift":
            len_mean *= 1 + 0.6 * min(1.0, since / 20)
        lengths = np.clip(np.rint(len_mean + len_noise), 4, MAX_LEN).astype(int)
        mask = np.arange(MAX_LEN)[None, :] < lengths[:, None]
        policy_lp = np.where(mask, train_logp[ids], 0.0)
        ref_lp = np.where(mask, logq[ids], 0.0)
        rollout_lp = np.where(mask, log_roll[ids] + rollout_noise, 0.0)
        entropy = -float(np.sum(np.exp(logp) * logp))
        entropies = np.where(mask, entropy, 0.0)

        token_kl = _kl(logp, logq)
        self.expected_kl.append(token_kl * len_mean)
        healthy_kl = self._token_kl(healthy_m) * LEN_MEAN
        gain = self.alpha * math.sqrt(max(healthy_kl, 0.0))
        if active and kind == "reward_hacking":
            extra = math.sqrt(token_kl * len_mean) - math.sqrt(healthy_kl)
            gain += 0.15 * self.alpha * extra
        rewards = 0.5 + gain + reward_noise
        if active and kind == "rejected_input" and since % 3 == 0 and since < 30:
            policy_lp = policy_lp.copy()
            policy_lp[since % BATCH, : 1 + since % 4] = np.nan
        extras = {"completions/clipped_ratio": float(np.mean(lengths >= MAX_LEN))}
        return Batch(
            step=step,
            wall_time=wall,
            token_ids=ids,
            mask=mask,
            policy_logprobs=policy_lp,
            ref_logprobs=ref_lp,
            rollout_logprobs=rollout_lp,
            entropies=entropies,
            rewards=rewards,
            kl_coef=self.config["kl_coef"],
            extras=extras,
        )

    def _carrier_logit(self, policy: np.ndarray, ramp: float) -> float:
        """Logit giving the carrier token the KL the bulk drift gave up.

        Its probability is 1% (six or so uses a batch: the top 1% of tokens) and its
        log-ratio to the reference makes up the per-token KL.
        """
        if ramp <= 0:
            return self.z_ref[CARRIER]
        rest = np.delete(policy, CARRIER)
        log_rest = math.log(np.exp(rest - rest.max()).sum()) + rest.max()
        prob = 0.01 * ramp
        return log_rest + math.log(prob / (1 - prob))

    def summary_row(self, batch: Batch) -> dict[str, Any]:
        base = {"step": batch.step, "wall_time": batch.wall_time}
        try:
            summary = summarize(
                batch.policy_logprobs,
                batch.ref_logprobs,
                batch.mask,
                rewards=batch.rewards,
                kl_coef=batch.kl_coef,
                rollout_logprobs=batch.rollout_logprobs,
                entropies=batch.entropies,
                token_ids=batch.token_ids,
            ).as_dict()
        except InvalidInput as exc:
            return {**base, "status": "rejected", "reject_reason": str(exc)}
        return {**base, "status": "ok", "reject_reason": None, **summary, **batch.extras}

    def true_onset(self, df: pd.DataFrame) -> int | None:
        if self.kind == "budget":
            budget = 1.5 * self.config["target_kl"]
            above = np.flatnonzero(np.asarray(self.expected_kl) > budget)
            above = above[above >= self.onset]
            return int(above[0]) if len(above) else None
        if self.kind == "stalled":
            return int(df["step"].iloc[-1])
        return self.onset
