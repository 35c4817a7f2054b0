"""The formats ``klmon import`` reads: name -> how to turn a file into what is stored."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.errors import InvalidInput
from monitor.ingest.importers import (
    csv_table,
    hf_console,
    jsonl,
    parquet,
    tokens,
    trainer_state,
    verl,
)
from monitor.ingest.importers.base import (
    ColumnBatch,
    FloatColumns,
    RawTable,
    Tick,
    n_rows,
)
from monitor.ingest.importers.detect import TITLES
from monitor.ingest.importers.tables import Prepared, build, build_frame, merge


@dataclass(frozen=True)
class ReadOptions:
    """How to read one file, the same for every format."""

    #: wall time for rows that carry none (the file's modification time)
    default_wall_time: float
    #: ``--map``: source key -> stored name (None drops the key)
    user_map: dict[str, str | None] | None = None
    #: ``--step-column``: the key that holds the step
    step_column: str | None = None


@dataclass(frozen=True)
class Format:
    """A log format: its name (``--format``, stored as ``import:<name>``) and its reader."""

    name: str
    title: str
    read: Callable[[Path, Tick], RawTable] | None = None
    # formats that compute their own step rows (per-token logs) prepare directly
    prepare_fn: Callable[..., Prepared] | None = None
    # columnar formats read in batches: (path, tick) -> the file's producer and its batches
    # (a clean batch comes as a ``ColumnBatch``: float64 columns, see ``build_frame``)
    read_batches: Callable[[Path, Tick], tuple[str, Iterator[RawTable | ColumnBatch]]] | None = None
    # the fast path of a clean file: its float64 columns and missing cells, or None
    read_frame: Callable[[Path, Tick], FloatColumns | None] | None = None

    def chunks(self, path: Path, tick: Tick, options: ReadOptions) -> Iterator[Prepared]:
        """What to write, one bounded batch at a time for columnar formats (one for others).

        A step that recurs in a later batch is not merged with the earlier one: it is then a
        replay or a conflict, as in a second import.
        """
        if self.read_batches is None:
            yield self.prepare(path, tick, options)
            return
        producer, batches = self.read_batches(path, tick)
        offset = 0
        first: Prepared | None = None
        for batch in batches:
            kwargs: dict[str, Any] = {
                "fmt": self.name,
                "path": path,
                "default_wall_time": options.default_wall_time,
                "user_map": options.user_map,
                # later batches keep the first one's step: its column, or the row order
                "step_column": options.step_column if first is None else first.step_column,
                "row_order": first is not None and first.step_column is None,
                "row_offset": offset,
                "producer": producer,
            }
            chunk = None
            if isinstance(batch, RawTable):
                table = batch
            else:
                chunk = build_frame(batch.columns, batch.nulls, **kwargs)
                table = batch.records(offset) if chunk is None else RawTable()
                rows = n_rows(batch.columns)
            if chunk is None:
                chunk = build(table, **kwargs)
                rows = len(table.records)
            if first is None:
                first = chunk
            else:  # the same column, however the first batch chose it
                chunk.step_source = first.step_source
            offset += rows
            yield chunk

    def prepare(self, path: Path, tick: Tick, options: ReadOptions) -> Prepared:
        """The whole file in memory (see :meth:`chunks` for bounded memory)."""
        if self.prepare_fn is not None:
            if options.step_column is not None:
                raise InvalidInput(
                    f"{path}: --step-column applies to step tables; a per-token log's step "
                    "is its step (global_step, iteration, _step) key"
                )
            return self.prepare_fn(
                path,
                tick,
                default_wall_time=options.default_wall_time,
                user_map=options.user_map,
            )
        if self.read is None:
            parts = list(self.chunks(path, tick, options))
            return merge(parts) if parts else Prepared(fmt=self.name, producer="generic")
        columns = self.read_frame(path, tick) if self.read_frame is not None else None
        if columns is not None:
            prepared = build_frame(
                *columns,
                fmt=self.name,
                path=path,
                default_wall_time=options.default_wall_time,
                user_map=options.user_map,
                step_column=options.step_column,
            )
            if prepared is not None:
                return prepared
        return build(
            self.read(path, tick),
            fmt=self.name,
            path=path,
            default_wall_time=options.default_wall_time,
            user_map=options.user_map,
            step_column=options.step_column,
        )


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("trainer_state", TITLES["trainer_state"], trainer_state.read),
        Format("jsonl", TITLES["jsonl"], jsonl.read, read_frame=jsonl.read_frame),
        Format("csv", TITLES["csv"], csv_table.read, read_frame=csv_table.read_frame),
        Format("parquet", TITLES["parquet"], read_batches=parquet.read_batches),
        Format("verl", TITLES["verl"], verl.read),
        Format("hf_console", TITLES["hf_console"], hf_console.read),
        Format("tokens", TITLES["tokens"], prepare_fn=tokens.prepare),
    )
}
