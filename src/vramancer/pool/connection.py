"""One node's connection to the pool's NATS servers, kept up in the background.

:class:`PoolConnection` never fails because a server is down: ``start()`` returns at once and
nats-py keeps trying every ``reconnect_wait_s``, forever (start-up included). What needs the
server goes through :attr:`PoolConnection.js` / :attr:`PoolConnection.nc`, which raise
:class:`NatsUnavailable` (503, ``nats_unavailable``) while it cannot be reached.

nats-py re-sends plain subscriptions after a reconnect, but JetStream pull consumers and KV
watchers (ordered consumers) silently stop when the server restarts. Whoever holds one
re-creates it in an :meth:`PoolConnection.on_connect` callback: the callbacks run after the first
connect and after every reconnect, one after the other, in the order they were registered, with
:meth:`PoolConnection.ensure_infra` (the buckets and streams) first. A callback that fails is
logged and tried again (after ``reconnect_wait_s``, doubling up to 30 s, and at the next
reconnect); it never takes the connection down. Callbacks must not wait for one another: they
run in one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from vramancer.errors import BackendUnavailable, ConfigError
from vramancer.pool.kvbucket import DEFAULT_MAX_VALUE
from vramancer.pool.settings import NatsSettings
from vramancer.pool.subjects import (
    DEAD_STREAM,
    DEAD_SUBJECTS,
    NODES_BUCKET,
    POOL_BUCKET,
    TASKS_BUCKET,
    WORK_STREAM,
    WORK_SUBJECTS,
)

__all__ = [
    "BUCKETS",
    "DEAD_MAX_AGE_S",
    "NatsUnavailable",
    "OnConnect",
    "PoolConnection",
    "as_unavailable",
]

log = logging.getLogger(__name__)

#: The pool's KV buckets (history 1 each: the latest value is all anyone reads; direct gets;
#: values up to the task queue's ``DEFAULT_MAX_VALUE``).
BUCKETS = (NODES_BUCKET, TASKS_BUCKET, POOL_BUCKET)
#: Dead letters are kept this long (seconds).
DEAD_MAX_AGE_S = 7 * 86400.0
#: The longest pause between two tries of a failing on-connect callback.
MAX_RETRY_S = 30.0
#: Unanswered pings (one per ``heartbeat_s``) after which the connection counts as lost.
PINGS_OUTSTANDING = 3
#: JetStream's error code for "stream name already in use" (a concurrent creation).
_STREAM_NAME_IN_USE = 10058

OnConnect = Callable[[], Awaitable[None]]


class NatsUnavailable(BackendUnavailable):
    """The pool's NATS servers cannot be reached (or did not answer); the reason is the message."""

    code = "nats_unavailable"
    http_status = 503


#: What nats-py raises when the server is away or does not answer in time.
_NATS_FAILURES: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    asyncio.TimeoutError,
    OSError,
)


@contextlib.contextmanager
def as_unavailable(doing: str) -> Iterator[None]:
    """Turn a NATS failure met while ``doing`` something into :class:`NatsUnavailable`."""
    try:
        yield
    except NatsUnavailable:
        raise
    except _NATS_FAILURES as exc:
        raise NatsUnavailable(f"NATS: {doing} failed: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    """A one-line reason for a NATS failure."""
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text and name not in text else (text or name)


@dataclass(eq=False, slots=True)
class _Callback:
    run: OnConnect
    #: The connection generation it last completed for (-1: never).
    done_for: int = -1


class PoolConnection:
    """The node's NATS connection: background (re)connects, on-connect callbacks, the pool's
    streams and buckets. ``name`` labels the connection on the server (monitoring)."""

    def __init__(self, settings: NatsSettings, *, name: str) -> None:
        self._settings = settings
        self._name = name
        self._client: Client | None = None
        self._jetstream: JetStreamContext | None = None
        self._kvs: dict[str, KeyValue] = {}
        self._callbacks: list[_Callback] = []
        self._infra = _Callback(self.ensure_infra)
        #: Bumped at each connect and reconnect; callbacks run once per generation.
        self._generation = 0
        self._wake = asyncio.Event()
        self._up = asyncio.Event()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_error: str | None = None
        #: A refusal of our credentials seen since the last connect: it outlives the socket
        #: errors that follow it (the server closes the connection after refusing).
        self._refusal: str | None = None
        self._outage_logged = False
        self._version: tuple[int, int, int] | None = None
        self._stopping = False

    # -- state --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected and not self._stopping

    @property
    def state(self) -> Literal["connected", "disconnected"]:
        return "connected" if self.connected else "disconnected"

    @property
    def ready(self) -> bool:
        """Connected, and every on-connect callback (the infrastructure first) has run since."""
        return self.connected and self._ready.is_set()

    @property
    def last_error(self) -> str | None:
        """The last failure seen (connecting, authenticating, a callback); a refusal of the
        credentials is kept over the socket errors that follow it. None once connected again."""
        if self._refusal is not None and self._refusal != self._last_error:
            return f"{self._refusal} (then {self._last_error})"
        return self._refusal or self._last_error

    @property
    def server_version(self) -> tuple[int, int, int] | None:
        """``(major, minor, patch)`` of the server last connected to (from its INFO)."""
        return self._version

    def server_at_least(self, major: int, minor: int) -> bool:
        """Whether the server last connected to is at least ``major.minor``."""
        return self._version is not None and self._version[:2] >= (major, minor)

    @property
    def nc(self) -> Client:
        """The connected client; :class:`NatsUnavailable` while not connected."""
        if self._client is None or not self.connected:
            raise self.unavailable()
        return self._client

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context; :class:`NatsUnavailable` while not connected."""
        client = self.nc
        if self._jetstream is None:
            self._jetstream = client.jetstream()
        return self._jetstream

    def unavailable(self, doing: str | None = None) -> NatsUnavailable:
        """The error to raise while the servers cannot be reached."""
        where = ", ".join(self._settings.servers) or "(no [nats] url)"
        error = self.last_error
        reason = f": {error}" if error else ""
        what = f"{doing}: " if doing else ""
        return NatsUnavailable(f"{what}NATS at {where} is not reachable{reason}", servers=where)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; returns at once. Bad settings (a missing
        credentials file, an incomplete TLS pair) raise :class:`ConfigError` here."""
        if self._client is not None:
            return
        options = self._options()
        self._stopping = False
        self._client = Client()
        self._tasks = [
            asyncio.create_task(self._connect(options), name=f"nats-connect-{self._name}"),
            asyncio.create_task(self._run_callbacks(), name=f"nats-on-connect-{self._name}"),
        ]

    async def stop(self) -> None:
        """Close the connection; callbacks stop running. Safe to call twice."""
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        client, self._client = self._client, None
        if client is not None and not client.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)
        self._jetstream = None
        self._kvs.clear()
        self._up.clear()
        self._ready.clear()

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a connection; whether there is one."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout_s)
        return self.connected

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until connected and every on-connect callback has run."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self.ready

    def on_connect(self, callback: OnConnect) -> Callable[[], None]:
        """Run ``callback`` after the first connect and after every reconnect (at once when
        already connected). Returns a function that unregisters it."""
        entry = _Callback(callback)
        self._callbacks.append(entry)
        self._ready.clear()
        self._wake.set()

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(entry)

        return remove

    # -- connecting ---------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        s = self._settings
        if not s.servers:
            raise ConfigError("nats.url: no NATS server configured", field="nats.url")
        options: dict[str, Any] = {
            "servers": s.servers,
            "name": self._name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": s.reconnect_wait_s,
            "connect_timeout": s.connect_timeout_s,
            # A server that vanished without closing the socket (a host down, a partition) is
            # noticed after PINGS_OUTSTANDING unanswered pings, not nats-py's default 4 minutes.
            "ping_interval": max(1.0, s.heartbeat_s),
            "max_outstanding_pings": PINGS_OUTSTANDING,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
            "inbox_prefix": s.inbox_prefix,
        }
        if s.token:
            options["token"] = s.token
        if s.creds is not None:
            options["user_credentials"] = str(_readable(s.creds, "nats.creds"))
        if s.nkey_seed is not None:
            options["nkeys_seed"] = str(_readable(s.nkey_seed, "nats.nkey_seed"))
        if (s.creds or s.nkey_seed) and importlib.util.find_spec("nkeys") is None:
            raise ConfigError(
                "nats.creds / nats.nkey_seed need the 'nkeys' package (pip install nkeys)",
                field="nats.creds" if s.creds else "nats.nkey_seed",
            )
        context = tls_context(s)
        if context is not None:
            options["tls"] = context
        return options

    async def _connect(self, options: dict[str, Any]) -> None:
        """Connect (nats-py retries forever by itself); a failure it gives up on (bad options)
        is retried here after ``reconnect_wait_s``."""
        while not self._stopping:
            client = self._client
            if client is None:
                return
            try:
                await client.connect(**options)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._note_error(exc)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 5)
                await asyncio.sleep(self._settings.reconnect_wait_s)
                self._client = Client()
                self._jetstream = None
                self._kvs.clear()
                continue
            await self._on_up("connected")
            return

    async def _on_up(self, how: str) -> None:
        client = self._client
        if client is None:
            return
        self._version = _version_of(client)
        self._last_error = None
        self._refusal = None
        self._outage_logged = False
        self._generation += 1
        self._ready.clear()
        self._up.set()
        self._wake.set()
        url = client.connected_url
        log.info("NATS %s to %s (server %s)", how, url.netloc if url else "?", self._version)

    async def _on_error(self, exc: Exception) -> None:
        self._note_error(exc)

    def _note_error(self, exc: BaseException) -> None:
        self._last_error = describe(exc)
        refused = isinstance(exc, nats.errors.AuthorizationError) or (
            "authorization" in self._last_error.lower()
        )
        if refused and self._refusal is None:
            self._refusal = self._last_error
            self._outage_logged = False
        if self._outage_logged:
            log.debug("NATS: %s", self._last_error)
        else:
            self._outage_logged = True
            log.warning(
                "NATS: %s (retrying every %ss)", self._last_error, self._settings.reconnect_wait_s
            )

    async def _on_disconnected(self) -> None:
        if self._up.is_set() and not self._stopping:
            log.warning("NATS disconnected; reads answer from what is known until it is back")
        self._up.clear()
        self._ready.clear()

    async def _on_reconnected(self) -> None:
        await self._on_up("reconnected")

    async def _on_closed(self) -> None:
        self._up.clear()
        self._ready.clear()

    # -- on-connect callbacks -----------------------------------------------------------

    async def _run_callbacks(self) -> None:
        """Run the callbacks not yet run for this generation, whenever woken."""
        delay = self._settings.reconnect_wait_s
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.connected:
                continue
            generation = self._generation
            failed = await self._run_pending(generation)
            if generation != self._generation:
                self._wake.set()
                continue
            if not failed:
                delay = self._settings.reconnect_wait_s
                if not self._wake.is_set():
                    self._last_error = None
                    self._ready.set()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = min(MAX_RETRY_S, delay * 2)
            self._wake.set()

    async def _run_pending(self, generation: int) -> bool:
        """Run, in order, what has not run for ``generation``; whether one failed. Nothing runs
        after a failing :meth:`ensure_infra` (the others need its buckets and streams)."""
        failed = False
        for entry in [self._infra, *self._callbacks]:
            if entry.done_for == generation:
                continue
            if generation != self._generation or not self.connected:
                return failed
            try:
                await entry.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed = True
                self._last_error = f"on-connect callback {_name_of(entry.run)}: {describe(exc)}"
                log.warning("NATS: %s (tried again later)", self._last_error, exc_info=True)
                if entry is self._infra:
                    return True
                continue
            entry.done_for = generation
        return failed

    # -- infrastructure -----------------------------------------------------------------

    async def ensure_infra(self) -> None:
        """Create the pool's buckets and streams when absent (existing ones are left as they
        are). Idempotent; safe while other nodes do the same. Needs nats-server 2.9 or later."""
        with as_unavailable("creating the pool's buckets and streams"):
            for bucket in BUCKETS:
                await self._ensure_bucket(bucket)
            replicas = self._settings.replicas
            await self._ensure_stream(
                StreamConfig(
                    name=WORK_STREAM,
                    subjects=[WORK_SUBJECTS],
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.FILE,
                    num_replicas=replicas,
                )
            )
            await self._ensure_stream(
                StreamConfig(
                    name=DEAD_STREAM,
                    subjects=[DEAD_SUBJECTS],
                    retention=RetentionPolicy.LIMITS,
                    storage=StorageType.FILE,
                    num_replicas=replicas,
                    max_age=DEAD_MAX_AGE_S,
                )
            )

    async def _ensure_bucket(self, bucket: str) -> KeyValue:
        js = self.js
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(
                bucket=bucket,
                history=1,
                storage=StorageType.FILE,
                replicas=self._settings.replicas,
                # The task queue's own settings (pool/kvbucket.py), whoever creates it first.
                max_value_size=DEFAULT_MAX_VALUE,
                direct=True,
            )
            try:
                kv = await js.create_key_value(config)
                log.info("NATS: created KV bucket %s", bucket)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                kv = await js.key_value(bucket)
        self._kvs[bucket] = kv
        return kv

    async def _ensure_stream(self, config: StreamConfig) -> None:
        js = self.js
        assert config.name is not None
        try:
            found = await js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            found = None
        if found is not None:
            have = (found.config.retention, found.config.subjects)
            if have != (config.retention, config.subjects):
                log.warning(
                    "NATS: stream %s exists with retention %s and subjects %s (expected %s, %s); "
                    "it is left as it is",
                    config.name,
                    *have,
                    config.retention,
                    config.subjects,
                )
            return
        try:
            await js.add_stream(config)
            log.info("NATS: created stream %s", config.name)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise

    async def kv(self, bucket: str) -> KeyValue:
        """The KV bucket ``bucket`` (created when absent); :class:`NatsUnavailable` while the
        servers cannot be reached."""
        cached = self._kvs.get(bucket)
        if cached is not None:
            self.nc  # noqa: B018  (raises NatsUnavailable while disconnected)
            return cached
        with as_unavailable(f"opening KV bucket {bucket}"):
            return await self._ensure_bucket(bucket)


def tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    """The TLS context of ``tls_ca`` / ``tls_cert`` / ``tls_key``, or None when none is set."""
    if settings.tls_ca is None and settings.tls_cert is None and settings.tls_key is None:
        return None
    if (settings.tls_cert is None) != (settings.tls_key is None):
        missing = "nats.tls_key" if settings.tls_key is None else "nats.tls_cert"
        raise ConfigError(
            f"{missing}: nats.tls_cert and nats.tls_key go together (a client certificate and "
            "its key)",
            field=missing,
        )
    ca = _readable(settings.tls_ca, "nats.tls_ca") if settings.tls_ca is not None else None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca is not None else None
    )
    if settings.tls_cert is not None and settings.tls_key is not None:
        cert = _readable(settings.tls_cert, "nats.tls_cert")
        key = _readable(settings.tls_key, "nats.tls_key")
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"nats.tls_cert / nats.tls_key: cannot load the certificate: {exc}",
                field="nats.tls_cert",
            ) from exc
    return context


def _readable(path: Path, field: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{field}: {str(file)!r} is not a readable file", field=field)
    return file


def _version_of(client: Client) -> tuple[int, int, int] | None:
    try:
        version = client.connected_server_version
        found = (version.major or 0, version.minor or 0, version.patch or 0)
    except (ValueError, TypeError):
        return None
    return found if found != (0, 0, 0) else None


def _name_of(callback: OnConnect) -> str:
    return getattr(callback, "__qualname__", None) or repr(callback)
