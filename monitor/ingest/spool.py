"""The durable local spool: append-only files of checksummed records, one series per process.

Every record the live client produces is appended here by its background thread *before* any
database write (a write-ahead log), so a down, locked or slow database, or a crash of the
process, never loses an acknowledged step: the client replays the spool when the database
comes back, and ``klmon sync`` replays what a dead process left behind.

File layout (all integers little-endian)::

    file    := FILE_MAGIC record*
    record  := RECORD_MAGIC  length:u32  crc32(body):u32  body[length]
    body    := json_length:u32  json[json_length]  blobs
    json    := {"type": "run" | "step" | "status" | "commit", ...}

A numpy array inside a record is stored raw in ``blobs`` and referenced from the JSON as
``{"__nd__": [offset, dtype, shape]}`` (no pickle: a spool file is data, never code), and so is
a ``bytes`` value (a drill-down sample's payload), as ``{"__b__": [offset, length]}``. The JSON
is written and read with orjson (a step's token strings made the standard library's encoder
and decoder about a millisecond of the writer's GIL time a step), falling back to the
standard library for what orjson refuses (lone surrogates in a text, keys that are not
strings); NaN and infinities in lists are stored as null, "no data", as everywhere in klmon.
A bad checksum or a truncated tail is reported as a :class:`CorruptRecord` and the reader
resyncs on the next RECORD_MAGIC, so one damaged record never hides the rest of the file.

Each file begins with a ``run`` record that names the run (project, name, config, rank,
world size), so a file is self-contained: it can be replayed into a database that has never
heard of the run. The owning process holds an exclusive ``flock`` on its files; ``klmon
sync`` skips files whose lock is held (their writer is alive) and the kernel releases the
lock when the writer dies, even by ``kill -9``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

try:
    from monitor._kernel import writev_holding_gil as _writev_holding_gil
except ImportError:  # not built (or Windows): os.writev
    _writev_holding_gil = None

FILE_MAGIC = b"KLSPOOL1"
RECORD_MAGIC = b"KLR\x01"
_RECORD_HEAD = struct.Struct("<4sII")  # magic, body length, crc32(body)
_U32 = struct.Struct("<I")
SUFFIX = ".klspool"
MAX_RECORD_BYTES = 256 * 1024 * 1024
"""The largest record a reader accepts; :meth:`SpoolWriter.append` refuses larger ones
(:class:`RecordTooLarge`), so nothing is ever written that cannot be read back."""
DEAD_SUFFIX = ".klspool-dead"


class RecordTooLarge(ValueError):
    """A record would exceed MAX_RECORD_BYTES: it is not written."""


ENV_SPOOL_DIR = "KLMON_SPOOL_DIR"


def default_spool_dir() -> Path:
    """``$KLMON_SPOOL_DIR``, else ``$XDG_CACHE_HOME/klmon/spool`` (``~/.cache/klmon/spool``)."""
    env = os.environ.get(ENV_SPOOL_DIR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "klmon" / "spool"


def spool_dir(override: str | os.PathLike[str] | None = None) -> Path:
    return Path(override).expanduser() if override else default_spool_dir()


# --- encoding -------------------------------------------------------------------------------


_STEP_PLAIN_KEYS = frozenset(("metrics", "q", "vocab"))
"""Fields of a ``step`` record (``monitor.ingest.records``) that hold only plain JSON values
(lists of numbers, strings, None): written as they are, without the walk that looks for
arrays and bytes (tens of calls a step; a trainer's ~30 metrics are one list each)."""


def encode_parts(record: dict[str, Any]) -> list[bytes | memoryview]:
    """One framed record as a list of buffers (arrays are not copied): magic, length,
    crc32 and the body (JSON plus raw array blobs)."""
    blobs: list[memoryview] = []
    offset = 0

    def convert(value: Any) -> Any:
        nonlocal offset
        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            raw = memoryview(arr).cast("B") if arr.size else memoryview(b"")
            ref = {"__nd__": [offset, arr.dtype.str, list(arr.shape)]}
            blobs.append(raw)
            offset += raw.nbytes
            return ref
        if isinstance(value, bytes):  # a sample's payload: raw, no base64
            blobs.append(memoryview(value))
            offset += len(value)
            return {"__b__": [offset - len(value), len(value)]}
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            # Lists of plain values (token strings, numbers) go to JSON as they are.
            if value and not isinstance(value[0], dict | list | tuple | np.ndarray):
                return value
            return [convert(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, float) and value != value:  # NaN is not JSON
            return None
        return value

    if record.get("type") == "step":  # the common record: skip its lists of plain values
        body = {k: v if k in _STEP_PLAIN_KEYS else convert(v) for k, v in record.items()}
    else:
        body = convert(record)
    head = _json_bytes(body)
    first = _U32.pack(len(head)) + head
    length = len(first) + offset
    if length > MAX_RECORD_BYTES:
        raise RecordTooLarge(
            f"spool record of {length} bytes: at most {MAX_RECORD_BYTES} are written"
        )
    crc = zlib.crc32(first)
    for b in blobs:
        crc = _crc32_holding_gil(b, crc)
    return [_RECORD_HEAD.pack(RECORD_MAGIC, length, crc), first, *blobs]


_CRC_CHUNK = 4096
"""zlib releases the GIL to checksum more than 5 KiB. On the caller's thread (a spilled raw
step, megabytes) each release lets a busy background thread in, and taking the GIL back can
cost up to the switch interval (5 ms) every time: checksummed in chunks below that size, the
call keeps the GIL for the millisecond or two the checksum takes."""


def _crc32_holding_gil(data: memoryview, crc: int) -> int:
    if data.nbytes <= _CRC_CHUNK:
        return zlib.crc32(data, crc)
    for i in range(0, data.nbytes, _CRC_CHUNK):
        crc = zlib.crc32(data[i : i + _CRC_CHUNK], crc)
    return crc


def encode_record(record: dict[str, Any]) -> bytes:
    """One framed record as bytes (see :func:`encode_parts`)."""
    return b"".join(encode_parts(record))


def _json_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(value, default=_json_default)
    except orjson.JSONEncodeError:  # e.g. a lone surrogate in a text: the slow encoder escapes it
        return json.dumps(value, separators=(",", ":"), default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def decode_body(body: bytes | memoryview) -> dict[str, Any]:
    (json_len,) = _U32.unpack_from(body, 0)
    raw = bytes(body[4 : 4 + json_len])
    try:
        head = orjson.loads(raw)
    except orjson.JSONDecodeError:  # escaped surrogates (see _json_bytes) or damage
        head = json.loads(raw)
    base = 4 + json_len
    mv = memoryview(body)

    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            span = value.get("__b__")
            if span is not None and len(value) == 1:
                start = base + int(span[0])
                return bytes(mv[start : start + int(span[1])])
            ref = value.get("__nd__")
            if ref is not None and len(value) == 1:
                off, dtype, shape = ref
                dt = np.dtype(dtype)
                n = int(np.prod(shape, dtype=np.int64)) if shape else 1
                start = base + int(off)
                return (
                    np.frombuffer(mv[start : start + n * dt.itemsize], dtype=dt)
                    .reshape(shape)
                    .copy()
                )
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(head)


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolRecord:
    """A good record: its byte range in the file and its decoded content."""

    offset: int
    end: int
    record: dict[str, Any]


@dataclass(frozen=True)
class CorruptRecord:
    """A damaged stretch of a spool file, skipped by the reader."""

    offset: int
    end: int
    reason: str


def iter_records(
    path: str | os.PathLike[str], start: int | None = None, end: int | None = None
) -> Iterator[SpoolRecord | CorruptRecord]:
    """Records of a spool file from ``start`` (default: after the file magic) to ``end``
    (default: end of file). Damaged records come out as CorruptRecord and reading goes on."""
    with open(path, "rb") as f:
        if start is None:
            magic = f.read(len(FILE_MAGIC))
            if magic != FILE_MAGIC:
                size = len(magic) + len(f.read())
                yield CorruptRecord(0, size, "not a klmon spool file (bad file magic)")
                return
            start = len(FILE_MAGIC)
        f.seek(start)
        data = f.read() if end is None else f.read(max(end - start, 0))
    yield from _scan(data, start)


def _scan(data: bytes, base: int) -> Iterator[SpoolRecord | CorruptRecord]:
    """Parse records from ``data`` (which starts at file offset ``base``), resyncing on the
    next record magic after damage."""
    view = memoryview(data)
    size = len(data)
    pos = 0
    bad_from: int | None = None
    bad_reason = ""
    while pos < size:
        reason = ""
        if size - pos < _RECORD_HEAD.size:
            reason = "truncated record header"
        else:
            magic, length, crc = _RECORD_HEAD.unpack_from(data, pos)
            if magic != RECORD_MAGIC:
                reason = "bad record magic"
            elif length > MAX_RECORD_BYTES:
                reason = f"implausible record length {length}"
            elif pos + _RECORD_HEAD.size + length > size:
                reason = "truncated record (file ends inside it)"
            else:
                body = view[pos + _RECORD_HEAD.size : pos + _RECORD_HEAD.size + length]
                if zlib.crc32(body) != crc:
                    reason = "checksum mismatch"
                else:
                    try:
                        record = decode_body(body)
                    except (ValueError, TypeError, KeyError, IndexError, struct.error) as exc:
                        reason = f"undecodable record ({exc})"
                    else:
                        if bad_from is not None:
                            yield CorruptRecord(base + bad_from, base + pos, bad_reason)
                            bad_from = None
                        end = pos + _RECORD_HEAD.size + length
                        yield SpoolRecord(base + pos, base + end, record)
                        pos = end
                        continue
        if bad_from is None:
            bad_from, bad_reason = pos, reason
        nxt = data.find(RECORD_MAGIC, pos + 1)
        if nxt < 0:
            break
        pos = nxt
    if bad_from is not None:
        yield CorruptRecord(base + bad_from, base + size, bad_reason)


# --- writing --------------------------------------------------------------------------------


def _safe(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:limit].strip("-.") or "x"


class SpoolWriter:
    """This process's spool for one run: a series of segment files, each starting with the
    run record. Thread-safe appends; the files are 0600 in a 0700 directory and flock'ed
    while this writer lives. Segments are rolled over at ``max_segment_bytes`` and deleted by
    :meth:`release` once everything in them is in the database."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        header: dict[str, Any],
        *,
        max_segment_bytes: int = 64 * 1024 * 1024,
        fsync_interval: float | None = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.header = dict(header, type="run")
        self.max_segment_bytes = max_segment_bytes
        self.fsync_interval = fsync_interval
        self._lock = threading.Lock()
        self._stem = "{}.{}.r{}.{}.{}.{}".format(
            _safe(str(header.get("project", "run"))),
            _safe(str(header.get("name", "run"))),
            int(header.get("rank", 0)),
            _safe(socket.gethostname(), 30),
            os.getpid(),
            time.time_ns() // 1_000_000,
        )
        self._seq = 0
        self._fd = -1
        self._path: Path | None = None
        self._size = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self.closed = False
        # segment number -> (path, fd) for segments not yet released
        self._open: dict[int, tuple[Path, int]] = {}
        self._final_sizes: dict[int, int] = {}
        self._after_header: dict[int, int] = {}
        self._roll()

    # The active segment ---------------------------------------------------------------------

    @property
    def segment(self) -> int:
        return self._seq

    @property
    def path(self) -> Path | None:
        return self._path

    def segment_path(self, seq: int) -> Path | None:
        entry = self._open.get(seq)
        return entry[0] if entry else None

    @property
    def stem(self) -> str:
        """The name shared by this writer's files (without segment number and suffix)."""
        return self._stem

    def _roll(self) -> None:
        seq = self._seq + 1
        path = self.directory / f"{self._stem}.{seq:04d}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            data = FILE_MAGIC + encode_record(dict(self.header, segment=seq))
            _write_all(fd, data)
        except OSError:
            # Disk full: leave no half-made segment behind; the next append tries again.
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        if self._fd >= 0:
            self._final_sizes[self._seq] = self._size
        self._seq = seq
        self._fd, self._path, self._size = fd, path, len(data)
        self._after_header[seq] = len(data)
        self._end = (self._seq, self._size)
        self._open[self._seq] = (path, fd)

    def append(
        self, record: dict[str, Any], *, may_fsync: bool = True, hold_gil: bool = False
    ) -> tuple[int, int, int]:
        """Append one record; returns (segment, start offset, end offset). Once this returns
        the record is in the operating system's page cache: it survives the death of this
        process (even kill -9), and an fsync at most ``fsync_interval`` seconds later makes it
        survive a power loss. ``may_fsync=False``: never fsync here (the caller must not wait
        for the disk; :meth:`maybe_fsync` runs periodically anyway). The fsync runs outside
        the lock, so a concurrent append never waits for the disk. ``hold_gil``: write without
        releasing the GIL (see :func:`_write_parts`)."""
        parts = encode_parts(record)
        with self._lock:
            if self.closed:
                raise OSError("spool is closed")
            if self._size >= self.max_segment_bytes:
                self._roll()
            before = self._size
            try:
                self._size += _write_parts(self._fd, parts, hold_gil)
            except OSError:
                # Disk full...: cut the partial record off, so readers never see it; if even
                # that fails, a reader skips it (bad checksum) and resyncs on the next one.
                try:
                    os.ftruncate(self._fd, before)
                    self._size = before
                except OSError:
                    self._size = os.fstat(self._fd).st_size
                self._end = (self._seq, self._size)
                raise
            self._end = (self._seq, self._size)
            self._dirty = True
            where = (self._seq, before, self._size)
        if may_fsync:
            self.maybe_fsync()
        return where

    def end(self) -> tuple[int, int]:
        """(segment, offset) of the end of what has been appended so far (lock-free: one
        attribute read, so a reader never waits for a writer)."""
        return self._end

    def after_header(self, seq: int) -> int:
        """The offset of a segment's first record after its run record."""
        return self._after_header.get(seq, len(FILE_MAGIC))

    def segment_end(self, seq: int) -> tuple[int, bool]:
        """(size, final) of a segment: final once a newer segment has been started."""
        cur_seq, cur_size = self._end
        if seq == cur_seq:
            return cur_size, False
        return self._final_sizes.get(seq, 0), True

    def fsync(self) -> None:
        self._sync_now()

    def maybe_fsync(self) -> None:
        """fsync if records were appended and ``fsync_interval`` has passed since the last
        one (also called periodically, so a quiet spool is not left unsynced)."""
        if self.fsync_interval is None or not self._dirty:
            return
        if time.monotonic() - self._last_sync >= self.fsync_interval:
            self._sync_now()

    def _sync_now(self) -> None:
        with self._lock:
            fd, self._dirty = self._fd, False
            self._last_sync = time.monotonic()
            if self.closed or fd < 0:
                return
        try:
            os.fsync(fd)
        except OSError:  # closed or rolled under us: the next sync covers it
            self._dirty = True

    def _fsync_locked(self) -> None:
        if self._dirty and self._fd >= 0:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def release(self, seq: int) -> None:
        """Delete a finished segment (every record in it is in the database). The active
        segment is never deleted here."""
        with self._lock:
            if seq == self._seq:
                return
            entry = self._open.pop(seq, None)
            self._after_header.pop(seq, None)
        if entry:
            path, fd = entry
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.close(fd)

    def close(self, *, delete: bool) -> None:
        """Close every segment; ``delete``: remove them (all their records are stored)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._fsync_locked()
            entries = list(self._open.values())
            self._open.clear()
        for path, fd in entries:
            if delete:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            os.close(fd)


_HOLD_GIL_MAX_BYTES = 16 << 20
"""A write with ``hold_gil`` keeps the GIL up to this size (a (256, 2048) raw step is ~5 MB,
a millisecond into the page cache); a larger one, which a slow disk could stretch to a long
stall of every thread, releases it as usual."""


def _write_parts(fd: int, parts: list[bytes | memoryview], hold_gil: bool = False) -> int:
    """Write the buffers in one ``writev`` (one GIL release, not one per buffer; none with
    ``hold_gil`` where ``monitor._kernel`` is built, up to ``_HOLD_GIL_MAX_BYTES``: a step
    spilled on the training loop's thread, which could otherwise wait up to the switch
    interval to take the GIL back from a busy writer thread) and whatever a short write left;
    returns the bytes written. An ``OSError`` may leave part of them written: the caller
    truncates the file back."""
    total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    hold = hold_gil and _writev_holding_gil is not None and total <= _HOLD_GIL_MAX_BYTES
    writev = _writev_holding_gil if hold else os.writev
    done = writev(fd, parts)
    if done < total:
        _write_all(fd, memoryview(b"".join(parts))[done:])
    return total


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class DeadLetterFile:
    """Records the database refused, kept for inspection (``*.klspool-dead``, same framing as
    a spool file, never replayed by ``klmon sync``). Each entry is ``{"type": "dead",
    "reason": ..., "run": {...}, "record": {...}}``. Created on the first entry."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any], reason: str, run: dict[str, Any]) -> None:
        """Add one refused record; OSError if it cannot be written (disk full)."""
        entry = {"type": "dead", "reason": reason, "t": time.time(), "run": run, "record": record}
        try:
            data = encode_record(entry)
        except RecordTooLarge:
            data = encode_record({**entry, "record": _record_head(record)})
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                if os.fstat(fd).st_size == 0:
                    _write_all(fd, FILE_MAGIC)
                _write_all(fd, data)
            finally:
                os.close(fd)


def _record_head(record: dict[str, Any]) -> dict[str, Any]:
    """The small fields of a record (type, step, rank, time), for a dead letter too large to
    keep whole."""
    return {k: record.get(k) for k in ("type", "step", "rank", "t", "status", "reason")}


# --- discovering files ----------------------------------------------------------------------


def spool_files(directory: str | os.PathLike[str]) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.endswith(SUFFIX) and p.is_file())


def dead_letter_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The dead-letter files (records a database refused) in a spool directory."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.endswith(DEAD_SUFFIX) and p.is_file())


class FileLock:
    """A non-blocking exclusive flock on a spool file: held means its writer is alive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def acquire(self) -> bool:
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            return False
        return True

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
