"""Signing keys of the replication journal: one key per UTC hour, derived from the shared secret.

The key of hour ``h`` is HKDF-SHA256 (RFC 5869) of the secret with salt ``b"vramancer-ha"`` and
info ``b"delta-key:" + str(h)``. A leaked hour key signs only that hour's deltas, and a receiver
accepts the current and the previous hour only (``KeyRing.accepts``), so a captured delta cannot
be replayed a day later. Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import OrderedDict

from vramancer.replication.settings import MIN_SECRET_BYTES

SALT = b"vramancer-ha"
INFO_PREFIX = b"delta-key:"
KEY_BYTES = 32
#: Hour keys kept by a ``KeyRing`` (old journals verify many hours; a receiver needs two).
CACHE_SIZE = 256


def hour_of(unix_s: float) -> int:
    """The UTC hour number of a Unix time (hours since 1970-01-01T00:00Z)."""
    return int(unix_s // 3600)


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) with SHA-256: extract then expand to ``length`` bytes."""
    if not 0 < length <= 255 * hashlib.sha256().digest_size:
        raise ValueError(f"length: HKDF-SHA256 gives 1 to 8160 bytes, not {length}")
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def hour_key(secret: bytes, hour: int) -> bytes:
    """The 32-byte signing key of ``hour``."""
    return hkdf_sha256(secret, salt=SALT, info=INFO_PREFIX + str(hour).encode(), length=KEY_BYTES)


class KeyRing:
    """The hour keys of one shared secret, derived once and cached (the most recent
    ``CACHE_SIZE`` hours asked for)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"secret: at least {MIN_SECRET_BYTES} bytes are needed (got {len(secret)})"
            )
        self._secret = bytes(secret)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "KeyRing(secret=<hidden>)"

    def key(self, hour: int) -> bytes:
        """The key of ``hour`` (cached)."""
        with self._lock:
            found = self._cache.get(hour)
            if found is not None:
                self._cache.move_to_end(hour)
                return found
        derived = hour_key(self._secret, hour)
        with self._lock:
            self._cache[hour] = derived
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return derived

    @staticmethod
    def accepts(hour: int, now_hour: int) -> bool:
        """A record signed in ``hour`` is taken at ``now_hour``: the current or previous hour."""
        return hour in (now_hour, now_hour - 1)
