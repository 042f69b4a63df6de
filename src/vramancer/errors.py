"""Typed errors of the library. Each carries a stable ``code`` and the HTTP status the API uses.

The library never imports the API; the API maps these by their ``http_status`` attribute.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import Any


class VramancerError(Exception):
    """Base class. ``details`` holds machine-readable context (e.g. requested/available bytes)."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(VramancerError):
    code = "invalid_input"
    http_status = 422


class NotFound(VramancerError):
    code = "not_found"
    http_status = 404


class Conflict(VramancerError):
    code = "conflict"
    http_status = 409


class InsufficientMemory(Conflict):
    """Not enough memory: ``details`` has ``requested_bytes`` and ``available_bytes``."""

    code = "insufficient_memory"


class BackendUnavailable(VramancerError):
    """A backend (Ollama, a driver, a broker) cannot be reached; the reason is the message."""

    code = "backend_unavailable"
    http_status = 503


class Forbidden(VramancerError):
    code = "forbidden"
    http_status = 403


class ShuttingDown(VramancerError):
    code = "shutting_down"
    http_status = 503


class OperationTimeout(VramancerError):
    code = "timeout"
    http_status = 504


class ConfigError(VramancerError):
    """Bad settings: the message names the key and the expected form."""

    code = "config_error"


class InsufficientStorage(VramancerError):
    """The disk (or the file system of a tier) is full: a write was refused and undone.

    Raised for ``ENOSPC``, ``EDQUOT`` and ``EFBIG`` from block files and for SQLite's
    "database or disk is full"; ``details`` has ``where`` (the block or file being written).
    """

    code = "insufficient_storage"
    http_status = 507


class DataDirInUse(ConfigError):
    """Another process holds the data directory: two stores on one directory would take each
    other's files for strays."""

    code = "data_dir_in_use"


class CatalogCorrupt(ConfigError):
    """The memory store's metadata database cannot be read; the message says how to recover."""

    code = "catalog_corrupt"


#: ``errno`` values that mean "no room left to write": the disk, a quota, a file size limit.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or a quota, or a file size limit) is full: an ``OSError``
    with one of :data:`FULL_ERRNOS`, or SQLite's "database or disk is full"."""
    if isinstance(exc, OSError):
        return exc.errno in FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "disk is full" in str(exc)
        )
    return False


def disk_full_error(exc: BaseException, where: str) -> InsufficientStorage:
    """The typed error for a full disk found while writing ``where``."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return InsufficientStorage(
        f"not enough disk space to write {where} ({reason}); free space and try again. "
        "Nothing was changed.",
        where=where,
    )
