"""The fastpath's errors: a transfer that failed says why, and stored nothing."""

from __future__ import annotations

from vramancer.errors import BackendUnavailable


class FastpathError(BackendUnavailable):
    """A transfer failed (peer unreachable or gone mid-transfer, checksum mismatch, refused)."""
