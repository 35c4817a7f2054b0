"""Importers of existing training logs: ``klmon import`` as a library.

Formats (detected from content; see :mod:`.detect`): Hugging Face ``trainer_state.json``,
JSONL and CSV step tables, Parquet (with pyarrow, read in batches), veRL console logs,
Hugging Face / TRL console logs (the Trainer's printed dicts), and per-token JSONL from which
klmon computes its own summaries. What the keys of each tool mean is in :mod:`.keys`, the
one key table the live TRL integration shares. A run holds one source file (see
:mod:`.importer`); lines that cannot be read are skipped and listed.

Example::

    from monitor.ingest.importers import import_path, parse_map
    report = import_path(db, "outputs/checkpoint-250", mapping=parse_map(["kl=k3"]))
    print("\\n".join(report.summary_lines()))
"""

from monitor.ingest.importers.detect import detect_format
from monitor.ingest.importers.importer import (
    DEFAULT_PROJECT,
    ImportReport,
    default_run_name,
    import_path,
    parse_map,
    prepare_path,
)
from monitor.ingest.importers.keys import KeyMeaning, detect_producer, lookup
from monitor.ingest.importers.registry import FORMATS

__all__ = [
    "DEFAULT_PROJECT",
    "FORMATS",
    "ImportReport",
    "KeyMeaning",
    "default_run_name",
    "detect_format",
    "detect_producer",
    "import_path",
    "lookup",
    "parse_map",
    "prepare_path",
]
