"""The tokenizer a trainer holds, given to its klmon run as the token ledger's vocabulary."""

from __future__ import annotations

import logging
from typing import Any

from monitor.ingest.client import Run

log = logging.getLogger("klmon.integrations")


def tokenizer_of(*owners: Any) -> Any:
    """The first tokenizer found on ``owners`` (``processing_class``, then ``tokenizer``); a
    processor (multimodal) gives the tokenizer it wraps. None when there is none."""
    for owner in owners:
        for name in ("processing_class", "tokenizer"):
            tok = getattr(owner, name, None)
            if tok is not None:
                return getattr(tok, "tokenizer", tok)
    return None


def adopt_tokenizer(run: Run, *owners: Any) -> None:
    """Give ``run`` the trainer's tokenizer as its vocabulary, unless the caller gave one;
    never raises (a tokenizer klmon cannot use leaves the ids without text)."""
    if run.has_vocabulary:
        return
    tok = tokenizer_of(*owners)
    if tok is None:
        return
    try:
        run.set_vocabulary(tok)
    except Exception as exc:  # never into training
        log.warning("klmon: the trainer's tokenizer cannot name token ids: %s", exc)
