"""The formats ``klmon import`` reads: name -> how to turn a file into what is stored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from monitor.ingest.importers import (
    csv_table,
    hf_console,
    jsonl,
    parquet,
    tokens,
    trainer_state,
    verl,
)
from monitor.ingest.importers.base import RawTable, Tick
from monitor.ingest.importers.detect import TITLES
from monitor.ingest.importers.tables import Prepared, build


@dataclass(frozen=True)
class Format:
    """A log format: its name (``--format``, stored as ``import:<name>``) and its reader."""

    name: str
    title: str
    read: Callable[[Path, Tick], RawTable] | None = None
    # formats that compute their own step rows (per-token logs) prepare directly
    prepare_fn: Callable[..., Prepared] | None = None

    def prepare(
        self,
        path: Path,
        tick: Tick,
        *,
        default_wall_time: float,
        user_map: dict[str, str | None] | None = None,
    ) -> Prepared:
        if self.prepare_fn is not None:
            return self.prepare_fn(
                path, tick, default_wall_time=default_wall_time, user_map=user_map
            )
        assert self.read is not None
        return build(
            self.read(path, tick),
            fmt=self.name,
            path=path,
            default_wall_time=default_wall_time,
            user_map=user_map,
        )


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("trainer_state", TITLES["trainer_state"], trainer_state.read),
        Format("jsonl", TITLES["jsonl"], jsonl.read),
        Format("csv", TITLES["csv"], csv_table.read),
        Format("parquet", TITLES["parquet"], parquet.read),
        Format("verl", TITLES["verl"], verl.read),
        Format("hf_console", TITLES["hf_console"], hf_console.read),
        Format("tokens", TITLES["tokens"], prepare_fn=tokens.prepare),
    )
}
