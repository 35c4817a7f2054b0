"""What the keys of other tools' logs mean: the key-meaning table.

A key means different things in different tools (docs/ARCHITECTURE.md): TRL GRPO's ``kl`` is a
token mean of k3, KTO's ``kl`` is a batch estimate over mismatched pairs, PPO's
``approx_kl`` is between the old and the new policy, not to the reference. So a log's
*producer* is recognised first from its whole key set, and keys are looked up in that
producer's table, then in the Hugging Face Trainer's common keys, then in a small generic
table. A key whose meaning is known fills a klmon step column (``quantity``) and is
described in ``metric_info`` with its estimator and scale; every source key is also kept as
an extra metric under its own name.

Scales: ``token-mean`` mean over response tokens; ``seq-sum`` per-sequence sum over tokens,
averaged over the batch (the PPO penalty); ``seq-mean`` per-sequence token mean, averaged
over sequences; ``seq`` one value per sequence, batch mean; ``tokens`` a token count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from monitor.store.tables import STEP_INT_COLUMNS


@dataclass(frozen=True)
class KeyMeaning:
    """What one source key means.

    ``quantity``: the klmon step column it fills, None when it is kept only as a metric.
    ``priority``: lower wins when several keys of a row fill the same quantity.
    ``keep_metric``: False only for klmon's own export columns, which are step columns.
    """

    quantity: str | None
    estimator: str | None = None
    scale: str | None = None
    description: str | None = None
    priority: int = 0
    keep_metric: bool = True


def _m(
    quantity: str | None,
    estimator: str | None = None,
    scale: str | None = None,
    description: str | None = None,
    priority: int = 0,
) -> KeyMeaning:
    return KeyMeaning(quantity, estimator, scale, description, priority)


_OLD_NEW = "old-vs-new policy (the sampling policy vs the updated one, PPO trust region), NOT KL to the reference"  # noqa: E501

# --- Hugging Face Trainer keys every TRL trainer logs -------------------------------------
HF_COMMON: dict[str, KeyMeaning] = {
    "loss": _m(None, description="training loss"),
    "grad_norm": _m(None, description="gradient norm before clipping"),
    "learning_rate": _m(None, description="learning rate"),
    "epoch": _m(None, description="epochs done (fractional)"),
    "num_tokens": _m(None, scale="tokens", description="tokens processed so far (cumulative)"),
    "num_input_tokens_seen": _m(None, scale="tokens", description="input tokens seen so far"),
    "total_flos": _m(None, description="floating-point operations so far"),
    "mean_token_accuracy": _m(None, description="share of next tokens predicted right (SFT)"),
}

# --- TRL GRPOTrainer (also RLOOTrainer >= 0.17, GSPO/DAPO/Dr.GRPO: same keys) --------------
TRL_GRPO: dict[str, KeyMeaning] = {
    "kl": _m(
        "k3",
        "k3",
        "token-mean",
        "TRL GRPO: mean over completion tokens of k3 = exp(ref-logp) - (ref-logp) - 1 between "
        "policy and reference (per-sequence token mean averaged over sequences in TRL <= 0.15); "
        "logged only when beta > 0",
    ),
    "reward": _m("reward_mean", None, "seq", "mean total reward of the completions"),
    "reward_std": _m(
        "reward_std",
        None,
        "seq",
        "std of rewards (TRL averages the per-group std over prompt groups)",
    ),
    "completions/mean_length": _m(
        "resp_len_mean", None, "tokens", "mean completion length in tokens"
    ),
    "completion_length": _m(
        "resp_len_mean", None, "tokens", "mean completion length in tokens (older TRL)", 1
    ),
    "entropy": _m(
        "entropy_mean",
        None,
        "token-mean",
        "per-token entropy of the policy from its logits, mean over completion tokens",
    ),
    "completions/clipped_ratio": _m(
        None, None, "seq", "share of completions cut at max_completion_length (no EOS)"
    ),
    "completions/max_length": _m(None, None, "tokens", "longest completion in tokens"),
    "completions/min_length": _m(None, None, "tokens", "shortest completion in tokens"),
    "completions/mean_terminated_length": _m(
        None, None, "tokens", "mean length of completions that ended with EOS"
    ),
    "completions/max_terminated_length": _m(
        None, None, "tokens", "longest completion that ended with EOS"
    ),
    "completions/min_terminated_length": _m(
        None, None, "tokens", "shortest completion that ended with EOS"
    ),
    "frac_reward_zero_std": _m(
        None, None, None, "share of prompt groups whose rewards are all equal (no signal)"
    ),
    "clip_ratio": _m(
        None, None, "token-mean", f"share of tokens whose importance ratio was clipped, {_OLD_NEW}"
    ),
}
TRL_GRPO.update(
    {
        "sampling/sampling_logp_difference/mean": _m(
            None,
            None,
            "token-mean",
            "TRL GRPO/RLOO with vLLM importance-sampling correction: mean over completion tokens "
            "of |log p_vLLM - log p_train| (absolute, so not klmon's signed rollout_gap)",
        ),
        "sampling/sampling_logp_difference/max": _m(
            None, None, "token-mean", "largest |log p_vLLM - log p_train| of the batch"
        ),
    }
)
TRL_GRPO_PATTERNS: list[tuple[re.Pattern[str], KeyMeaning]] = [
    (
        re.compile(r"^sampling/importance_sampling_ratio/"),
        _m(None, None, "token-mean", "vLLM-vs-trainer importance-sampling ratio statistics"),
    ),
    (
        re.compile(r"^clip_ratio/"),
        _m(None, None, "token-mean", f"importance-ratio clipping statistics, {_OLD_NEW}"),
    ),
    (re.compile(r"^rewards/.+/std$"), _m(None, None, "seq", "std of one reward function")),
    (re.compile(r"^rewards/"), _m(None, None, "seq", "mean of one reward function")),
]

# --- TRL RLOOTrainer >= 0.23 (TRL 1.x): GRPO's keys, but ``kl`` is a token mean of k1 ------
# Its keys cannot be told from GRPO's, so a log is read as GRPO unless the producer is given
# (the live TRL callback knows its trainer; an import can say --map kl=k1).
TRL_RLOO: dict[str, KeyMeaning] = {
    **TRL_GRPO,
    "kl": _m(
        "k1",
        "k1",
        "token-mean",
        "TRL RLOO (>= 0.23): mean over completion tokens of log p - log q between policy and "
        "reference (k1), logged when beta > 0; the per-sequence sum is the reward penalty",
    ),
}

# --- OpenRLHF (PPO, REINFORCE++, GRPO; W&B keys ``train/<key>``) ---------------------------
OPENRLHF: dict[str, KeyMeaning] = {
    "kl": _m(
        "k1",
        "k1",
        "seq-mean",
        "OpenRLHF: batch mean of per-sequence token means of the KL to the reference, estimator "
        "--kl_estimator (k1 by default; k2/k3 when set: --map kl=k3 then)",
    ),
    "reward": _m("reward_mean", None, "seq", "mean reward of the samples"),
    "return": _m(None, None, "seq", "mean return (reward minus the KL penalty, discounted)"),
    "response_length": _m("resp_len_mean", None, "tokens", "mean response length"),
    "total_length": _m(None, None, "tokens", "mean prompt + response length"),
    "policy_loss": _m(None, description="policy-gradient loss"),
    "critic_loss": _m(None, description="value loss"),
    "values": _m(None, description="mean value prediction"),
    "ptx_loss": _m(None, description="pretraining (PTX) loss"),
    "actor_lr": _m(None, description="actor learning rate"),
    "critic_lr": _m(None, description="critic learning rate"),
    "entropy_loss": _m(
        "entropy_mean", None, "token-mean", "per-token entropy of the policy (entropy bonus)"
    ),
    "ppo_clip_ratio": _m(None, None, "token-mean", f"share of clipped ratios, {_OLD_NEW}"),
    "ppo_kl": _m(None, "k1", "token-mean", f"KL, {_OLD_NEW}"),
    "policy_update_steps": _m(None, description="policy updates done"),
}

# --- Tinker (thinking-machines-lab tinker-cookbook RL metrics) -----------------------------
TINKER: dict[str, KeyMeaning] = {
    "optim/kl_sample_train_v1": _m(
        "rollout_gap",
        "k1",
        "token-mean",
        "Tinker: mean over tokens of log p_sampler - log p_train (first-order KL estimate of "
        "the sampler vs the trainer): a rollout gap, NOT a KL to the reference",
    ),
    "optim/kl_sample_train_v2": _m(
        None,
        "k2",
        "token-mean",
        "Tinker: half the mean squared log p_sampler - log p_train (second-order estimate of "
        "the sampler-vs-trainer KL), NOT a KL to the reference",
    ),
    "optim/entropy": _m(
        "policy_nll",
        None,
        "token-mean",
        "Tinker: mean over sampled tokens of -log p_sampler (a sampled entropy estimate)",
    ),
    "env/all/reward/total": _m("reward_mean", None, "seq", "mean total reward of the episodes"),
    "env/all/ac_tokens_per_turn": _m(
        "resp_len_mean", None, "tokens", "mean action (response) tokens per turn"
    ),
    "kl_policy_base": _m(
        "k1",
        "k1",
        "token-mean",
        "Tinker (kl_penalty_coef > 0): mean over tokens of log p - log p_base, the KL to the "
        "base (reference) model",
    ),
}
TINKER_PATTERNS: list[tuple[re.Pattern[str], KeyMeaning]] = [
    (re.compile(r"^env/"), _m(None, description="environment statistic")),
    (re.compile(r"^time/"), _m(None, description="seconds spent in this phase")),
    (re.compile(r"^progress/"), _m(None, description="training progress")),
    (re.compile(r"^optim/"), _m(None, description="optimiser statistic")),
]

# --- TRL PPOTrainer / RLOOTrainer (0.12-0.16) and the legacy PPOTrainer (<= 0.11) ---------
TRL_PPO: dict[str, KeyMeaning] = {
    "objective/kl": _m(
        "kl_mean",
        "k1",
        "seq-sum",
        "TRL PPO/RLOO: batch mean of the per-sequence sum of log p - log q (k1) between "
        "policy and reference",
    ),
    "objective/entropy": _m(
        "entropy_mean",
        None,
        "seq-sum",
        "TRL PPO: batch mean of the per-sequence sum of -log p of the sampled tokens "
        "(a sampled entropy estimate per sequence, not per token)",
        1,
    ),
    "policy/entropy_avg": _m(
        "entropy_mean", None, "token-mean", "per-token entropy of the policy from its logits"
    ),
    "objective/non_score_reward": _m(
        None, "k1", "seq-sum", "KL penalty part of the reward: -kl_coef * per-sequence KL sum"
    ),
    "objective/rlhf_reward": _m(
        None, None, "seq", "score minus the KL penalty (what PPO maximises)"
    ),
    "objective/scores": _m("reward_mean", None, "seq", "mean reward-model score"),
    "objective/kl_coef": _m("kl_coef", None, None, "KL penalty coefficient (legacy TRL)"),
    "objective/logprobs": _m(None, None, "seq-sum", "mean per-sequence log p (legacy TRL)"),
    "objective/ref_logprobs": _m(
        None, None, "seq-sum", "mean per-sequence log q of the reference (legacy TRL)"
    ),
    "policy/approxkl_avg": _m(None, "k2", "token-mean", f"approximate KL, {_OLD_NEW}"),
    "policy/clipfrac_avg": _m(None, None, "token-mean", f"share of clipped ratios, {_OLD_NEW}"),
    "loss/policy_avg": _m(None, description="policy-gradient loss"),
    "loss/value_avg": _m(None, description="value loss"),
    "val/clipfrac_avg": _m(None, description="share of clipped value predictions"),
    "val/ratio": _m(None, description="mean new/old probability ratio"),
    "val/ratio_var": _m(None, description="variance of the new/old probability ratio"),
    "val/num_eos_tokens": _m(None, description="completions that ended with EOS"),
    "lr": _m(None, description="learning rate"),
    "episode": _m(None, description="episodes (prompts) seen so far"),
    "eps": _m(None, description="episodes per second"),
    # legacy PPOTrainer (trl <= 0.11) keys
    "env/reward_mean": _m("reward_mean", None, "seq", "mean reward (legacy TRL)", 1),
    "env/reward_std": _m("reward_std", None, "seq", "std of rewards (legacy TRL)", 1),
    "ppo/mean_scores": _m("reward_mean", None, "seq", "mean score (legacy TRL)", 2),
    "ppo/std_scores": _m("reward_std", None, "seq", "std of scores (legacy TRL)", 2),
    "tokens/responses_len_mean": _m(
        "resp_len_mean", None, "tokens", "mean response length (legacy TRL)"
    ),
    "ppo/mean_non_score_reward": _m(
        None, "k1", "seq-sum", "KL penalty part of the reward (legacy TRL)"
    ),
    "ppo/policy/approxkl": _m(None, "k2", "token-mean", f"approximate KL, {_OLD_NEW}"),
    "ppo/policy/policykl": _m(None, "k1", "token-mean", f"KL, {_OLD_NEW}"),
    "ppo/policy/clipfrac": _m(None, None, "token-mean", f"share of clipped ratios, {_OLD_NEW}"),
}

# --- TRL DPO-family (DPO, IPO, KTO, ORPO, CPO): no sampled responses, no step quantities -----
TRL_DPO: dict[str, KeyMeaning] = {
    "rewards/chosen": _m(
        None,
        "k1",
        "seq-sum",
        "DPO implicit reward of chosen responses: beta * (log p - log q) summed over the "
        "sequence (dataset responses, not samples of the policy)",
    ),
    "rewards/rejected": _m(
        None, "k1", "seq-sum", "DPO implicit reward of rejected responses: beta * seq log-ratio"
    ),
    "rewards/margins": _m(None, None, "seq", "mean chosen minus rejected implicit reward"),
    "rewards/accuracies": _m(None, None, "seq", "share of pairs with chosen reward > rejected"),
    "logps/chosen": _m(None, None, "seq-sum", "policy log-prob of chosen responses"),
    "logps/rejected": _m(None, None, "seq-sum", "policy log-prob of rejected responses"),
    "logits/chosen": _m(None, description="mean logit on chosen responses"),
    "logits/rejected": _m(None, description="mean logit on rejected responses"),
    "kl": _m(
        None,
        "k1",
        "seq-sum",
        "KTO reference point: batch estimate of KL(policy || reference) from mismatched "
        "prompt-completion pairs, clamped at 0; not comparable with klmon's kl_mean",
    ),
    "nll_loss": _m(None, None, "token-mean", "negative log-likelihood loss on chosen"),
    "log_odds_ratio": _m(None, description="ORPO log odds ratio"),
    "log_odds_chosen": _m(None, description="ORPO log odds of chosen"),
}

# --- veRL (console and tracking keys) ------------------------------------------------------
VERL: dict[str, KeyMeaning] = {
    "actor/kl_loss": _m(
        "k3",
        "k3",
        "token-mean",
        "veRL KL loss to the reference (use_kl_loss): kl_loss_type low_var_kl (k3 clamped to "
        "[-10, 10]) by default, aggregated by loss_agg_mode (token-mean by default)",
    ),
    "actor/kl_coef": _m("kl_coef", None, None, "KL loss coefficient (use_kl_loss)"),
    "critic/kl": _m(
        "k1",
        "k1",
        "seq-mean",
        "veRL in-reward KL penalty (use_kl_in_reward): batch mean of per-sequence token means "
        "of kl_penalty, which is 'kl' (k1) by default",
        1,
    ),
    "critic/kl_coeff": _m("kl_coef", None, None, "in-reward KL coefficient (older veRL)", 1),
    "actor/reward_kl_penalty": _m(
        "k1",
        "k1",
        "seq-mean",
        "veRL in-reward KL penalty: batch mean of per-sequence token means of kl_penalty "
        "(k1 by default)",
        1,
    ),
    "actor/reward_kl_penalty_coeff": _m("kl_coef", None, None, "in-reward KL coefficient", 1),
    "actor/ppo_kl": _m(None, "k1", "token-mean", f"KL, {_OLD_NEW}"),
    "actor/pg_clipfrac": _m(None, None, "token-mean", f"share of clipped ratios, {_OLD_NEW}"),
    "actor/pg_clipfrac_lower": _m(
        None, None, "token-mean", f"share of dual-clipped ratios, {_OLD_NEW}"
    ),
    "actor/pg_loss": _m(None, description="policy-gradient loss"),
    "actor/entropy": _m(
        "entropy_mean", None, "token-mean", "per-token entropy of the policy from its logits"
    ),
    "actor/entropy_loss": _m(
        "entropy_mean", None, "token-mean", "per-token entropy of the policy (older veRL)", 1
    ),
    "actor/grad_norm": _m(None, description="actor gradient norm"),
    "actor/lr": _m(None, description="actor learning rate"),
    "critic/score/mean": _m(
        "reward_mean", None, "seq", "mean sequence score from the reward function or model"
    ),
    "critic/score/max": _m(None, None, "seq", "highest sequence score"),
    "critic/score/min": _m(None, None, "seq", "lowest sequence score"),
    "critic/rewards/mean": _m(None, None, "seq", "mean sequence reward after the KL penalty"),
    "critic/vf_loss": _m(None, description="value loss"),
    "response_length/mean": _m("resp_len_mean", None, "tokens", "mean response length"),
    "response_length/max": _m(None, None, "tokens", "longest response"),
    "response_length/min": _m(None, None, "tokens", "shortest response"),
    "response_length/clip_ratio": _m(
        None, None, "seq", "share of responses cut at the maximum response length"
    ),
    "training/global_step": _m(None, description="global step"),
    "training/epoch": _m(None, description="epoch"),
    "training/rollout_probs_diff_mean": _m(
        None,
        None,
        "token-mean",
        "mean |p_rollout - p_train| in probability space (not klmon's rollout_gap, a "
        "log-prob difference)",
    ),
}
VERL_PATTERNS: list[tuple[re.Pattern[str], KeyMeaning]] = [
    (re.compile(r"^timing_s/"), _m(None, description="seconds spent in this phase")),
    (re.compile(r"^timing_per_token_ms/"), _m(None, description="milliseconds per token")),
    (re.compile(r"^perf/"), _m(None, description="throughput / memory")),
    (re.compile(r"^prompt_length/"), _m(None, None, "tokens", "prompt length statistics")),
    (re.compile(r"^critic/(advantages|returns|values)/"), _m(None, description="PPO statistics")),
    (re.compile(r"^val-(core|aux)/"), _m(None, description="validation metric")),
    (re.compile(r"^global_seqlen/"), _m(None, None, "tokens", "tokens per rank (balance)")),
]

# --- any step table whose producer is not recognised ---------------------------------------
GENERIC: dict[str, KeyMeaning] = {
    "reward": _m("reward_mean", None, "seq", "mean reward", 1),
    "reward_mean": _m("reward_mean", None, "seq", "mean reward"),
    "rewards/mean": _m("reward_mean", None, "seq", "mean reward", 2),
    "mean_reward": _m("reward_mean", None, "seq", "mean reward", 3),
    "score": _m("reward_mean", None, "seq", "mean score", 4),
    "scores": _m("reward_mean", None, "seq", "mean score", 5),
    "reward_std": _m("reward_std", None, "seq", "std of rewards"),
    "rewards/std": _m("reward_std", None, "seq", "std of rewards", 1),
    "kl_coef": _m("kl_coef", None, None, "KL penalty coefficient"),
    "entropy": _m("entropy_mean", None, None, "policy entropy (scale not stated by the log)"),
    "response_length": _m("resp_len_mean", None, "tokens", "mean response length"),
    "completion_length": _m("resp_len_mean", None, "tokens", "mean completion length", 1),
    "resp_len": _m("resp_len_mean", None, "tokens", "mean response length", 2),
    "mean_response_length": _m("resp_len_mean", None, "tokens", "mean response length", 3),
    "approx_kl": _m(
        None, None, None, f"by PPO convention an approximate KL, {_OLD_NEW}; --map it if not"
    ),
    "approxkl": _m(
        None, None, None, f"by PPO convention an approximate KL, {_OLD_NEW}; --map it if not"
    ),
    "kl": _m(
        None,
        None,
        None,
        "KL-like value of unknown estimator and reference; say what it is with "
        "--map kl=QUANTITY (e.g. kl_mean for a per-sequence sum, k3 for a token mean of k3)",
    ),
    "clip_fraction": _m(None, None, None, f"share of clipped ratios, {_OLD_NEW}"),
    "clipfrac": _m(None, None, None, f"share of clipped ratios, {_OLD_NEW}"),
    "completion_length_mean": _m("resp_len_mean", None, "tokens", "mean completion length", 4),
    "response_length_mean": _m("resp_len_mean", None, "tokens", "mean response length", 5),
    "response_length/mean": _m("resp_len_mean", None, "tokens", "mean response length", 6),
    "policy_entropy_mean": _m(
        "entropy_mean", None, "token-mean", "mean per-token entropy of the policy", 1
    ),
    "policy_entropy": _m("entropy_mean", None, None, "policy entropy (scale not stated)", 2),
    "mean_entropy": _m("entropy_mean", None, None, "policy entropy (scale not stated)", 3),
}

# klmon's own step quantities, as a user would assert them with --map (and as the generic
# table reads columns named after them).
QUANTITY_MEANINGS: dict[str, KeyMeaning] = {
    "kl_mean": _m("kl_mean", "k1", "seq-sum", "mean over sequences of kl_seq"),
    "kl_std": _m("kl_std", "k1", "seq-sum", "std over sequences of kl_seq"),
    "kl_min": _m("kl_min", "k1", "seq-sum", "lowest kl_seq of the step"),
    "kl_p05": _m("kl_p05", "k1", "seq-sum", "5th percentile of kl_seq"),
    "kl_p50": _m("kl_p50", "k1", "seq-sum", "median of kl_seq"),
    "kl_p95": _m("kl_p95", "k1", "seq-sum", "95th percentile of kl_seq"),
    "kl_p99": _m("kl_p99", "k1", "seq-sum", "99th percentile of kl_seq"),
    "kl_max": _m("kl_max", "k1", "seq-sum", "highest kl_seq of the step"),
    "k1": _m("k1", "k1", "token-mean", "mean over tokens of log p - log q"),
    "k2": _m("k2", "k2", "token-mean", "mean over tokens of (log p - log q)^2 / 2"),
    "k3": _m("k3", "k3", "token-mean", "mean over tokens of exp(-l) - 1 + l"),
    "neg_kl_frac": _m("neg_kl_frac", None, "seq", "share of sequences with kl_seq < 0"),
    "top1pct_share": _m(
        "top1pct_share", None, "token-mean", "share of positive l carried by the top 1% tokens"
    ),
    "resp_len_mean": _m("resp_len_mean", None, "tokens", "mean response tokens per sequence"),
    "policy_nll": _m("policy_nll", None, "token-mean", "mean over tokens of -log p"),
    "entropy_mean": _m("entropy_mean", None, "token-mean", "mean per-token entropy"),
    "reward_mean": _m("reward_mean", None, "seq", "mean reward"),
    "reward_std": _m("reward_std", None, "seq", "std of rewards"),
    "kl_coef": _m("kl_coef", None, None, "KL penalty coefficient"),
    "rollout_gap": _m("rollout_gap", None, "token-mean", "mean of log p_rollout - log p_train"),
    "n_sequences": _m("n_sequences", None, None, "sequences in the step"),
    "n_tokens": _m("n_tokens", None, "tokens", "response tokens in the step"),
    "vocab_top_share": _m(
        "vocab_top_share", None, None, "share of positive per-token-id l mass in the top 5 ids"
    ),
}
GENERIC.update(
    {q: _m(q, m.estimator, m.scale, m.description) for q, m in QUANTITY_MEANINGS.items()}
)

# Columns of klmon's own export (``klmon export``): step columns, not metrics.
KLMON_RESERVED: tuple[str, ...] = ("step", "wall_time", "status", "reject_reason", "ranks_seen")
KLMON_EXPORT: dict[str, KeyMeaning] = {
    q: KeyMeaning(q, m.estimator, m.scale, m.description, -1, keep_metric=False)
    for q, m in QUANTITY_MEANINGS.items()
}
KLMON_EXPORT.update({c: KeyMeaning(None, keep_metric=False) for c in KLMON_RESERVED})
# An extra metric whose name collides with a step column is exported as ``metric:<name>``.
METRIC_PREFIX = "metric:"


@dataclass(frozen=True)
class Producer:
    """A tool whose logs klmon recognises: its name (stored as metric_info.source) and keys."""

    name: str
    title: str
    keys: dict[str, KeyMeaning]
    patterns: tuple[tuple[re.Pattern[str], KeyMeaning], ...] = ()
    hf_trainer: bool = False


PRODUCERS: dict[str, Producer] = {
    "klmon": Producer("klmon", "klmon export", KLMON_EXPORT),
    "verl": Producer("verl", "veRL", VERL, tuple(VERL_PATTERNS)),
    "trl-ppo": Producer("trl-ppo", "TRL PPO/RLOO", TRL_PPO, hf_trainer=True),
    "trl-dpo": Producer("trl-dpo", "TRL DPO/KTO/ORPO/CPO", TRL_DPO, hf_trainer=True),
    "trl-grpo": Producer("trl-grpo", "TRL GRPO", TRL_GRPO, tuple(TRL_GRPO_PATTERNS), True),
    "trl-rloo": Producer(
        "trl-rloo", "TRL RLOO (>= 0.23)", TRL_RLOO, tuple(TRL_GRPO_PATTERNS), True
    ),
    "openrlhf": Producer("openrlhf", "OpenRLHF", OPENRLHF),
    "tinker": Producer("tinker", "Tinker", TINKER, tuple(TINKER_PATTERNS)),
    "generic": Producer("generic", "unknown producer", {}),
}

_GRPO_SIGNS = {
    "completion_length",
    "completions/mean_length",
    "frac_reward_zero_std",
    "clip_ratio",
    "clip_ratio/region_mean",
}


_VERL_SIGNS = {
    "actor/kl_loss",
    "actor/pg_loss",
    "actor/ppo_kl",
    "actor/pg_clipfrac",
    "actor/entropy",
    "critic/kl",
    "critic/rewards/mean",
    "critic/vf_loss",
    "response_length/mean",
}


_TINKER_SIGNS = {"optim/kl_sample_train_v1", "optim/kl_sample_train_v2", "optim/entropy"}


def base_key(key: str) -> str:
    """A key without the ``train/`` prefix Hugging Face's W&B/MLflow callbacks add."""
    return key[len("train/") :] if key.startswith("train/") else key


EVAL_PREFIXES = ("eval/", "eval_", "test/", "test_", "val-core/", "val-aux/")


def is_eval_key(key: str) -> bool:
    """Keys of evaluation rows (HF ``eval_loss`` / ``eval/loss``, veRL ``val-core/...``)."""
    return key.startswith(EVAL_PREFIXES)


def detect_producer(keys: Iterable[str]) -> str:
    """The tool that wrote a log, from its whole key set (see PRODUCERS).

    ``trl-rloo`` is never detected (its keys are GRPO's); callers that know the trainer pass
    it to :func:`lookup` themselves.
    """
    raw = set(keys)
    if set(KLMON_RESERVED) <= raw and {"kl_mean", "k3"} <= raw:
        return "klmon"
    names = {base_key(k) for k in raw}
    if names & _VERL_SIGNS or any(k.startswith(("timing_s/", "critic/score/")) for k in names):
        return "verl"
    ppo = {"objective/kl", "objective/scores", "objective/rlhf_reward", "policy/approxkl_avg"}
    if names & ppo or names & {"ppo/mean_scores", "env/reward_mean", "ppo/policy/approxkl"}:
        return "trl-ppo"
    if names & {"rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"}:
        return "trl-dpo"
    if names & _TINKER_SIGNS or any(k.startswith("env/all/") for k in names):
        return "tinker"
    if "actor_lr" in names or {"response_length", "total_length", "return"} <= names:
        return "openrlhf"
    grpo_signs = names & _GRPO_SIGNS or any(
        k.startswith(("rewards/", "completions/", "clip_ratio/")) for k in names
    )
    if grpo_signs and ("kl" in names or "reward" in names):
        return "trl-grpo"
    return "generic"


def lookup(producer: str, key: str) -> KeyMeaning | None:
    """The meaning of ``key`` in a log written by ``producer``; None when unknown.

    Evaluation keys never fill a step quantity: an eval reward is not the training reward.
    """
    prod = PRODUCERS[producer]
    if producer == "klmon":
        return prod.keys.get(key)
    if is_eval_key(key):
        prefix = next(p for p in EVAL_PREFIXES if key.startswith(p))
        inner = key[len(prefix) :]
        base = lookup(producer, inner) if inner else None
        desc = f"evaluation: {base.description}" if base and base.description else "evaluation"
        return KeyMeaning(
            None, base.estimator if base else None, base.scale if base else None, desc
        )
    name = base_key(key)
    found = prod.keys.get(name)
    if found is None:
        for pattern, meaning in prod.patterns:
            if pattern.search(name):
                found = meaning
                break
    if found is None and prod.hf_trainer:
        found = HF_COMMON.get(name)
    if found is None:
        found = GENERIC.get(name)
    return found


def is_int_quantity(quantity: str) -> bool:
    return quantity in STEP_INT_COLUMNS
