"""Where the real training logs of ../shared/realdata are: $KLMON_REALDATA, else the
``shared/realdata`` folder beside this checkout, else /work/shared/realdata. Tests read them
in place and skip with this path in the reason when none exists."""

from __future__ import annotations

import os
from pathlib import Path

_CANDIDATES = [
    Path(os.environ["KLMON_REALDATA"]) if os.environ.get("KLMON_REALDATA") else None,
    Path(__file__).resolve().parents[3] / "shared" / "realdata",
    Path("/work/shared/realdata"),
]

REALDATA: Path = next(
    (p for p in _CANDIDATES if p is not None and p.is_dir()),
    next(p for p in _CANDIDATES if p is not None),
)
