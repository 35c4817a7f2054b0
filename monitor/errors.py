"""One exception hierarchy for klmon. Errors of lower libraries are translated at the boundary."""


class KlmonError(Exception):
    """Base class of every error klmon raises on purpose."""


class InvalidInput(KlmonError, ValueError):
    """Input data is unusable; the message names the argument, the problem and where."""


class StoreError(KlmonError):
    """The database could not be read or written."""


class DatabaseUnavailable(StoreError):
    """The database cannot be reached (down, locked for too long, wrong URL)."""


class SchemaOutOfDate(StoreError):
    """The database schema is behind (or ahead of) this version of klmon."""


class NotFound(StoreError, LookupError):
    """A run, step or other record that was asked for does not exist."""


class ConfigError(KlmonError):
    """A setting (environment variable, rules file, command-line option) is invalid."""
