"""One error base for everything a user can get wrong; each message says what to do."""

from __future__ import annotations


class PgsinkError(Exception):
    """Base of all errors pgsink reports to users. The message is the whole story."""


class ConfigError(PgsinkError):
    """Invalid configuration (YAML, CLI arguments, rows in pgsink.*)."""


class MigrationError(PgsinkError):
    """The state schema cannot be brought up to date safely."""


class SourceError(PgsinkError):
    """A source database is unreachable or not set up for logical replication."""


class SecretError(PgsinkError):
    """Encryption key missing or wrong."""
