"""The database handle: an engine plus the transaction boundary where driver errors become
klmon errors (with the URL's password never shown)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from monitor.config import db_url
from monitor.errors import DatabaseUnavailable, SchemaOutOfDate, StoreError
from monitor.store.engine import is_sqlite, make_engine, redact_url
from monitor.store.schema import check_schema, ensure_schema

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class Database:
    """A klmon database. ``Database.open(url)`` checks the schema is current."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url

    @classmethod
    def open(
        cls, url: str | None = None, *, check: bool = True, create: bool = False, **engine_kwargs
    ) -> Database:
        """``check``: refuse a schema that is not at head. ``create``: an empty database (a
        new SQLite file, an empty PostgreSQL database) gets the schema instead of an error;
        one at an older revision still needs ``klmon db upgrade``."""
        url = db_url(url)
        db = cls(make_engine(url, **engine_kwargs), url)
        if create:
            with db.translate_errors():
                ensure_schema(db.engine)
            return db
        if check and db.is_sqlite:
            path = db.engine.url.database
            if path and path != ":memory:" and not Path(path).exists():
                # Opening would create an empty file: a typo in --db should not leave one.
                raise SchemaOutOfDate(
                    f"no database file at {path}: create it with `klmon db upgrade` "
                    "(with the same --db), or check the path"
                )
        if check:
            with db.translate_errors():
                check_schema(db.engine)
        return db

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.engine)

    @property
    def paramstyle(self) -> str:
        """The DB-API placeholder for exec_driver_sql: ``?`` (sqlite3) or ``%s`` (psycopg)."""
        return "?" if self.is_sqlite else "%s"

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            raise DatabaseUnavailable(
                f"database {self.safe_url} is unavailable: {_first_line(exc)}"
            ) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise DatabaseUnavailable(
                    f"database {self.safe_url} connection lost: {_first_line(exc)}"
                ) from exc
            raise StoreError(f"database {self.safe_url}: {_first_line(exc)}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"database {self.safe_url}: {_first_line(exc)}") from exc
        except OverflowError as exc:  # sqlite3 binding an integer beyond 64 bits
            raise StoreError(f"database {self.safe_url}: value out of range: {exc}") from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One ORM session per transaction: commit, or roll back and re-raise as StoreError.
        Only the alert engine's state and outbox use it: the ORM loads on first use."""
        from sqlalchemy.orm import Session

        with (
            self.translate_errors(),
            Session(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A Core connection in a transaction, for bulk statements."""
        with self.translate_errors(), self.engine.begin() as conn:
            yield conn

    def ping(self) -> None:
        """One round trip to the server; raises DatabaseUnavailable (or StoreError) when it
        cannot answer."""
        with self.begin() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        self.engine.dispose()


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__
