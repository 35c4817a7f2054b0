"""The drift vocabulary at one step, for a sentence in an alert email, the Alerts page or a
report: the tokens that carry the step's positive log-ratio and what grew since the run's
warm-up. Built on the reads of ``monitor.store.vocabulary``; formatted by
``monitor.charts.tables.vocabulary_line``."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from monitor.store.database import Database
from monitor.store.vocabulary import read_token_ledger, token_changes

#: The warm-up a step is compared with: the run's first steps (0 .. WARMUP_STEPS - 1),
#: and as many steps ending at the step itself.
WARMUP_STEPS = 20


@dataclass(frozen=True)
class StepVocabulary:
    """``top``: the step's top tokens (``read_token_ledger``, one step); ``changes``: tokens
    ranked by the growth of their log-ratio per 1k tokens from the warm-up to the
    ``WARMUP_STEPS`` steps ending at the step (``token_changes``), empty without a warm-up
    ledger. Both empty when the run has no ledger at the step."""

    step: int
    top: pd.DataFrame
    changes: pd.DataFrame


def step_vocabulary(db: Database, run_id: int, step: int, k: int = 3) -> StepVocabulary:
    """The drift vocabulary of ``run_id`` at ``step`` (see :class:`StepVocabulary`)."""
    top = read_token_ledger(db, run_id, step, step, k=k)
    changes = top.iloc[0:0]
    if not top.empty and step >= 2 * WARMUP_STEPS - 1:
        changes = token_changes(db, run_id, WARMUP_STEPS - 1, step, window=WARMUP_STEPS, k=k)
        if not changes.attrs.get("n_tokens_before"):
            changes = changes.iloc[0:0]
    return StepVocabulary(int(step), top, changes)
