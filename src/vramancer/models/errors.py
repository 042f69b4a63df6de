"""Errors of the model manager (each carries the HTTP status the API maps it to).

``BackendUnavailable`` (503: the backend cannot be reached), ``OperationTimeout`` (504) and
``InsufficientMemory`` (409) come from :mod:`vramancer.errors`; these add what only models need.
"""

from __future__ import annotations

from vramancer.errors import Conflict, VramancerError


class BackendError(VramancerError):
    """The backend answered, with an error (Ollama's HTTP 500, a model server that exited)."""

    code = "backend_error"
    http_status = 502


class ModelNotInBackend(BackendError):
    """The backend does not have the model (Ollama: "not found, try pulling it first")."""

    code = "model_not_in_backend"


class ProfileSwitchFailed(Conflict):
    """A profile switch stopped at a step; ``details`` has ``failed_step`` and ``steps``."""

    code = "profile_switch_failed"


class ModelBusy(Conflict):
    """The model stayed in use for longer than the wait allowed for an unload."""

    code = "model_busy"
