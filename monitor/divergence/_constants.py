"""The fixed bins of the token histogram and the limits every part of the package shares."""

from __future__ import annotations

import numpy as np

#: Edges of the token histogram of ``l_t``: 80 bins of 0.25 nats on [-10, 10]. Bins are
#: half-open ``[e_i, e_i+1)``; values below -10 are counted in the first bin and values at or
#: above +10 in the last, so the counts always sum to ``n_tokens``.
HIST_EDGES: np.ndarray = np.linspace(-10.0, 10.0, 81)
HIST_EDGES.flags.writeable = False
N_BINS = len(HIST_EDGES) - 1
BIN_SCALE = N_BINS / (HIST_EDGES[-1] - HIST_EDGES[0])  # bins per nat (4)
BIN_OFFSET = -HIST_EDGES[0] * BIN_SCALE  # bin index = floor(l * scale + offset)
ZERO_BIN = int(BIN_OFFSET)  # masked positions hold l = 0 and land here; they are removed

#: A log-probability may exceed 0 by this much before it is rejected: fp16/bf16 rounding of
#: values near 0 (bf16 has 8 significant bits) produces tiny positive numbers.
LOGPROB_TOLERANCE = 1e-3

#: top1pct_share looks at the top ``ceil(TOP_FRACTION * n_tokens)`` tokens by l_t.
TOP_FRACTION = 0.01

#: The scalar quantities of a step, in order: StepSummary's fields and the steps columns.
SCALAR_FIELDS = (
    "kl_mean",
    "kl_std",
    "kl_min",
    "kl_p05",
    "kl_p50",
    "kl_p95",
    "kl_p99",
    "kl_max",
    "k1",
    "k2",
    "k3",
    "neg_kl_frac",
    "top1pct_share",
    "resp_len_mean",
    "policy_nll",
    "entropy_mean",
    "reward_mean",
    "reward_std",
    "kl_coef",
    "rollout_gap",
    "n_sequences",
    "n_tokens",
    "vocab_top_share",
)
