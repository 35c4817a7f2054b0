"""Databases for tests: a migrated SQLite file, a URL that cannot be reached, step rows of a
simulated run, a simulated run with a token ledger.

Fixtures (``sqlite_url``, ``sqlite_db``, ``db_url``, ``db``) are in ``tests/conftest.py``;
these are the plain functions behind them, for tests that need several databases or one
per Hypothesis example (where a function-scoped fixture cannot be used).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from monitor.store.engine import make_engine
from monitor.store.schema import upgrade
from monitor.store.steps import STEP_COLUMNS


def migrate(url: str) -> str:
    """Upgrade the database at ``url`` to the head revision; returns ``url``."""
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return url


def migrated_sqlite(path: Path) -> str:
    """The URL of a new SQLite file at ``path``, migrated to head."""
    return migrate(f"sqlite:///{path}")


def down_url(db_url: str, tmp_path: Path) -> str:
    """A URL of the same kind as ``db_url`` that cannot be reached."""
    if db_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}"
    return "postgresql://postgres@127.0.0.1:1/nowhere"


def rows_of(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The step rows of a step table (a simulated run's ``steps_df``), for ``write_steps``:
    only the ``steps`` columns, without the missing values."""
    keep = [c for c in df.columns if c in STEP_COLUMNS]
    return [
        {k: v for k, v in r.items() if not (isinstance(v, float) and np.isnan(v))}
        for r in df[keep].to_dict("records")
    ]


def simulated_ledger_run(
    db_url: str,
    spool_dir: Path,
    name: str,
    kind: str = "reward_hacking",
    steps: int = 120,
    onset: int | None = 60,
    seed: int = 1,
) -> int:
    """Log a simulated run through the live client with its token ids and the simulator's
    vocabulary (so it has a token ledger); returns the run id once every step is stored."""
    import monitor
    from monitor.simulate import VOCAB, iter_batches

    with monitor.init(
        "sim", name, db=db_url, spool_dir=spool_dir, tokenizer=VOCAB, flush_interval=0.01
    ) as run:
        for b in iter_batches(kind, steps=steps, seed=seed, onset=onset):
            run.log_step(
                b.step,
                policy_logprobs=b.policy_logprobs,
                ref_logprobs=b.ref_logprobs,
                mask=b.mask,
                rewards=b.rewards,
                kl_coef=b.kl_coef,
                token_ids=b.token_ids,
                tokens=b.tokens,
            )
        assert run.flush(60), "the simulated run was not stored in time"
        return run.id
