"""Typed errors of the library. Each carries a stable ``code`` and the HTTP status the API uses.

The library never imports the API; the API maps these by their ``http_status`` attribute.
"""

from __future__ import annotations

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


class CatalogCorrupt(ConfigError):
    """The memory store's metadata database cannot be read; the message says how to recover."""

    code = "catalog_corrupt"
