"""The node registry: every node of the pool, its GPUs and its last heartbeat, in the
``vrm_nodes`` KV bucket (key: the node name; value: :class:`NodeInfo` as JSON).

Each node announces itself every ``heartbeat_s`` (:class:`Heartbeat`); every reader keeps an
in-memory mirror of the bucket, fed by a KV watcher (:class:`Registry`). The mirror survives a
lost connection, so reads answer from what is known; the watcher is re-created after every
reconnect, and its first replay replaces the mirror (a node deleted meanwhile leaves it).

A node's state is a pure function of the age of its last heartbeat (:func:`node_state`):
``up`` below ``stale_after_s``, ``stale`` from there (it gets no new work), ``down`` from
``down_after_s``. Heartbeats carry the announcing host's wall clock, so the hosts' clocks must
agree to well within ``stale_after_s`` (NTP does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from nats.js.kv import KeyValue

from vramancer.clock import Clock
from vramancer.devices.ids import node_name_problem
from vramancer.devices.types import SystemSnapshot
from vramancer.pool.connection import NatsUnavailable, PoolConnection, as_unavailable, describe
from vramancer.pool.settings import NatsSettings
from vramancer.pool.subjects import NODES_BUCKET

__all__ = [
    "MAX_DEVICES",
    "MAX_ENTRY_BYTES",
    "Heartbeat",
    "NodeDevice",
    "NodeInfo",
    "NodeState",
    "Registry",
    "node_info",
    "node_state",
]

log = logging.getLogger(__name__)

#: Bounds of one registry entry: a larger or longer one is refused (and skipped by readers).
MAX_ENTRY_BYTES = 256 * 1024
MAX_DEVICES = 256
_MAX_TEXT = 256
#: Format of the JSON entries; readers skip entries of a newer major format.
FORMAT = 1
_DELETES = ("DEL", "PURGE")
#: Seconds the first replay of a watcher may take (a reconnect then tries again).
REPLAY_TIMEOUT_S = 10.0


class NodeState(StrEnum):
    """A node as the age of its last heartbeat makes it."""

    UP = "up"
    #: Missed heartbeats: it gets no new work; its leased tasks are redelivered.
    STALE = "stale"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class NodeDevice:
    """One GPU of a node, as the node last announced it."""

    #: ``NODE/gpu:N``.
    id: str
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    #: What the node's arbiter can still grant on this GPU.
    grantable_bytes: int
    utilization_ratio: float | None
    temperature_celsius: float | None
    simulated: bool
    cuda_index: int | None
    #: The node's last poll of this GPU failed (the figures are its last good reading).
    error: bool

    def as_dict(self) -> dict[str, Any]:
        """The contract's device fields first (``id``, ``name``, ``memory_total_bytes``,
        ``memory_used_bytes``, ``simulated``), then the rest."""
        return {
            "id": self.id,
            "name": self.name,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "simulated": self.simulated,
            "index": self.index,
            "memory_free_bytes": self.memory_free_bytes,
            "grantable_bytes": self.grantable_bytes,
            "utilization_ratio": self.utilization_ratio,
            "temperature_celsius": self.temperature_celsius,
            "cuda_index": self.cuda_index,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node announces in each heartbeat."""

    name: str
    devices: tuple[NodeDevice, ...]
    running_tasks: int
    #: Unix seconds (the announcing host's clock).
    last_heartbeat: float
    #: Unix seconds at which the node started.
    started_at: float
    slots_per_device: int
    host_slots: int
    version: str
    #: The node also runs an orchestrator (``vramancer serve``), not only ``vramancer worker``.
    orchestrator: bool
    #: ``host:port`` of the node's fastpath (its blocks), None when it has none.
    fastpath: str | None = None

    def to_json(self) -> bytes:
        data = asdict(self)
        data["format"] = FORMAT
        text = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        if len(text) > MAX_ENTRY_BYTES:
            raise ValueError(f"node {self.name}: entry of {len(text)} bytes > {MAX_ENTRY_BYTES}")
        return text

    @classmethod
    def from_json(cls, raw: bytes) -> NodeInfo:
        """Read an entry; ``ValueError`` naming the field when it is malformed or too large."""
        if len(raw) > MAX_ENTRY_BYTES:
            raise ValueError(f"entry of {len(raw)} bytes > {MAX_ENTRY_BYTES}")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        return _node_from(_Fields(data, "node"))

    def as_dict(self, *, state: NodeState, now: float) -> dict[str, Any]:
        """A ``GET /v1/cluster/nodes`` item: the contract's fields (``name``, ``state``,
        ``last_heartbeat``, ``devices``, ``running_tasks``) first, then the rest."""
        return {
            "name": self.name,
            "state": state.value,
            "last_heartbeat": self.last_heartbeat,
            "devices": [d.as_dict() for d in self.devices],
            "running_tasks": self.running_tasks,
            "heartbeat_age_s": round(max(0.0, now - self.last_heartbeat), 3),
            "started_at": self.started_at,
            "slots_per_device": self.slots_per_device,
            "host_slots": self.host_slots,
            "version": self.version,
            "orchestrator": self.orchestrator,
            "fastpath": self.fastpath,
        }


class _Fields:
    """Typed reads of one JSON object; errors name the field (``node.devices[1].index``)."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object")
        self.data: dict[str, object] = data
        self.where = where

    def raw(self, key: str) -> object:
        if key not in self.data:
            raise ValueError(f"{self.where}.{key}: missing")
        return self.data[key]

    def text(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or len(value) > _MAX_TEXT:
            raise ValueError(f"{self.where}.{key}: expected a string of at most {_MAX_TEXT}")
        return value

    def count(self, key: str) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{self.where}.{key}: expected a non-negative integer")
        return value

    def maybe_count(self, key: str) -> int | None:
        return None if self.data.get(key) is None else self.count(key)

    def number(self, key: str) -> float:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.where}.{key}: expected a number")
        if not math.isfinite(value):
            raise ValueError(f"{self.where}.{key}: expected a finite number")
        return float(value)

    def maybe_number(self, key: str) -> float | None:
        return None if self.data.get(key) is None else self.number(key)

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise ValueError(f"{self.where}.{key}: expected true or false")
        return value


def _node_from(f: _Fields) -> NodeInfo:
    version = f.data.get("format", FORMAT)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT:
        raise ValueError(f"node.format: {version!r} is not a format this node reads")
    name = f.text("name")
    problem = node_name_problem(name)
    if problem is not None:
        raise ValueError(f"node.name: {problem}")
    devices = f.raw("devices")
    if not isinstance(devices, list) or len(devices) > MAX_DEVICES:
        raise ValueError(f"node.devices: expected a list of at most {MAX_DEVICES}")
    return NodeInfo(
        name=name,
        devices=tuple(
            _device_from(_Fields(d, f"node.devices[{i}]"), name) for i, d in enumerate(devices)
        ),
        running_tasks=f.count("running_tasks"),
        last_heartbeat=f.number("last_heartbeat"),
        started_at=f.number("started_at"),
        slots_per_device=f.count("slots_per_device"),
        host_slots=f.count("host_slots"),
        version=f.text("version"),
        orchestrator=f.flag("orchestrator"),
        fastpath=_address(f.data.get("fastpath")),
    )


def _address(value: object) -> str | None:
    """An announced ``host:port`` (absent in entries of older nodes)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_TEXT or ":" not in value:
        raise ValueError("node.fastpath: expected host:port")
    return value


def _device_from(f: _Fields, node: str) -> NodeDevice:
    index = f.count("index")
    device_id = f.text("id")
    if device_id != f"{node}/gpu:{index}":
        raise ValueError(f"{f.where}.id: expected {node}/gpu:{index}, got {device_id!r}")
    return NodeDevice(
        id=device_id,
        index=index,
        name=f.text("name"),
        memory_total_bytes=f.count("memory_total_bytes"),
        memory_used_bytes=f.count("memory_used_bytes"),
        memory_free_bytes=f.count("memory_free_bytes"),
        grantable_bytes=f.count("grantable_bytes"),
        utilization_ratio=f.maybe_number("utilization_ratio"),
        temperature_celsius=f.maybe_number("temperature_celsius"),
        simulated=f.flag("simulated"),
        cuda_index=f.maybe_count("cuda_index"),
        error=f.flag("error"),
    )


# -- pure policy ----------------------------------------------------------------------------


def node_state(
    info: NodeInfo, now: float, *, stale_after_s: float, down_after_s: float
) -> NodeState:
    """``up`` while the last heartbeat is younger than ``stale_after_s``, ``stale`` from
    ``stale_after_s``, ``down`` from ``down_after_s`` (both bounds included). A heartbeat from
    the future (clocks a little apart) counts as fresh."""
    age = now - info.last_heartbeat
    if age >= down_after_s:
        return NodeState.DOWN
    if age >= stale_after_s:
        return NodeState.STALE
    return NodeState.UP


def node_info(
    node: str,
    snapshot: SystemSnapshot,
    *,
    grantable: Mapping[str, int],
    running_tasks: int,
    now: float,
    started_at: float,
    slots_per_device: int,
    host_slots: int,
    version: str,
    orchestrator: bool,
    fastpath: str | None = None,
) -> NodeInfo:
    """The entry ``node`` announces from its latest device snapshot. ``grantable`` is keyed by
    the local name ``gpu:N``; a GPU missing there has nothing grantable (0)."""
    problem = node_name_problem(node)
    if problem is not None:
        raise ValueError(problem)
    devices = tuple(
        NodeDevice(
            id=f"{node}/gpu:{gpu.index}",
            index=gpu.index,
            name=gpu.name[:_MAX_TEXT],
            memory_total_bytes=max(0, gpu.memory_total_bytes),
            memory_used_bytes=max(0, gpu.memory_used_bytes),
            memory_free_bytes=max(0, gpu.memory_free_bytes),
            grantable_bytes=max(0, int(grantable.get(f"gpu:{gpu.index}", 0))),
            utilization_ratio=_finite(gpu.utilization_ratio),
            temperature_celsius=_finite(gpu.temperature_celsius),
            simulated=gpu.simulated,
            cuda_index=gpu.cuda_index,
            error=gpu.error is not None,
        )
        for gpu in snapshot.gpus
    )
    return NodeInfo(
        name=node,
        devices=devices,
        running_tasks=max(0, running_tasks),
        last_heartbeat=now,
        started_at=started_at,
        slots_per_device=slots_per_device,
        host_slots=host_slots,
        version=version[:_MAX_TEXT],
        orchestrator=orchestrator,
        fastpath=fastpath,
    )


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# -- the registry ---------------------------------------------------------------------------


class Registry:
    """The ``vrm_nodes`` bucket and its in-memory mirror."""

    def __init__(self, conn: PoolConnection, settings: NatsSettings, clock: Clock) -> None:
        self._conn = conn
        self._settings = settings
        self._clock = clock
        self._mirror: dict[str, NodeInfo] = {}
        self._follower: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._unregister: Callable[[], None] | None = None
        self._skipped: dict[str, bytes] = {}

    @property
    def connection(self) -> PoolConnection:
        return self._conn

    async def start(self) -> None:
        """Follow the bucket from every (re)connect on."""
        if self._unregister is None:
            self._unregister = self._conn.on_connect(self._watch)

    async def stop(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        await self._stop_watcher()

    async def announce(self, info: NodeInfo) -> None:
        """Write ``info`` under its name (and into this mirror at once);
        :class:`NatsUnavailable` when the servers cannot be reached."""
        raw = info.to_json()
        kv = await self._conn.kv(NODES_BUCKET)
        with as_unavailable(f"announcing node {info.name}"):
            await kv.put(info.name, raw)
        self._mirror[info.name] = info

    # -- reads (from the mirror: no I/O) ------------------------------------------------

    def nodes(self) -> list[NodeInfo]:
        """Every known node, by name."""
        return [self._mirror[name] for name in sorted(self._mirror)]

    def get(self, name: str) -> NodeInfo | None:
        return self._mirror.get(name)

    def state(self, name: str, now: float | None = None) -> NodeState | None:
        """The node's state at ``now`` (default: the clock's time); None for an unknown node."""
        info = self._mirror.get(name)
        if info is None:
            return None
        return self._state_of(info, self._clock.time() if now is None else now)

    def report(self, now: float | None = None) -> dict[str, Any]:
        """``GET /v1/cluster/nodes``: ``{"nodes": [...]}``, each as :meth:`NodeInfo.as_dict`."""
        at = self._clock.time() if now is None else now
        return {"nodes": [i.as_dict(state=self._state_of(i, at), now=at) for i in self.nodes()]}

    def _state_of(self, info: NodeInfo, now: float) -> NodeState:
        return node_state(
            info,
            now,
            stale_after_s=self._settings.stale_after_s,
            down_after_s=self._settings.down_after_s,
        )

    # -- the watcher ----------------------------------------------------------------------

    async def _watch(self) -> None:
        """(Re)create the watcher; its first replay replaces the mirror, then it follows."""
        await self._stop_watcher()
        kv = await self._conn.kv(NODES_BUCKET)
        with as_unavailable("watching the node registry"):
            watcher = await kv.watchall()
        self._watcher = watcher
        fresh: dict[str, NodeInfo] = {}
        try:
            with as_unavailable("reading the node registry"):
                while (entry := await _next(watcher)) is not None:
                    self._apply(fresh, entry)
        except BaseException:
            await self._stop_watcher()
            raise
        self._mirror = fresh
        self._follower = asyncio.create_task(self._follow(watcher), name="vrm-registry-watch")

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                self._apply(self._mirror, entry)

    def _apply(self, mirror: dict[str, NodeInfo], entry: KeyValue.Entry) -> None:
        key = entry.key
        if entry.operation in _DELETES:
            mirror.pop(key, None)
            return
        raw = entry.value or b""
        try:
            info = NodeInfo.from_json(raw)
            if info.name != key:
                raise ValueError(f"node.name: {info.name!r} is stored under key {key!r}")
        except ValueError as exc:
            if self._skipped.get(key) != raw[:64]:
                log.warning("node registry: skipping the entry of %r: %s", key, exc)
                self._skipped[key] = raw[:64]
            return
        self._skipped.pop(key, None)
        mirror[key] = info

    async def _stop_watcher(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await follower
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watcher.stop(), 2)  # type: ignore[no-untyped-call]


async def _next(watcher: KeyValue.KeyWatcher) -> KeyValue.Entry | None:
    """The watcher's next entry (None: the first replay is over)."""
    entry: KeyValue.Entry | None = await watcher.updates(  # type: ignore[no-untyped-call]
        timeout=REPLAY_TIMEOUT_S
    )
    return entry


class Heartbeat:
    """Announces ``build()`` every ``period_s`` (and at once after each reconnect). A server
    that is away is logged once per outage; the loop carries on. ``stop()`` leaves the entry:
    the node goes stale, then down, by age."""

    def __init__(self, registry: Registry, build: Callable[[], NodeInfo], period_s: float) -> None:
        if period_s <= 0:
            raise ValueError("period_s must be positive")
        self._registry = registry
        self._build = build
        self._period_s = period_s
        self._task: asyncio.Task[None] | None = None
        self._now = asyncio.Event()
        self._unregister: Callable[[], None] | None = None
        self._failing = False
        #: Heartbeats written since start (for tests and metrics).
        self.sent = 0

    async def start(self) -> None:
        if self._task is None:
            self._unregister = self._registry.connection.on_connect(self._wake)
            self._task = asyncio.create_task(self._loop(), name="vrm-heartbeat")

    async def stop(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _wake(self) -> None:
        self._now.set()

    async def beat(self) -> bool:
        """Announce once; whether it was written."""
        try:
            await self._registry.announce(self._build())
        except NatsUnavailable as exc:
            self._note_failure(describe(exc))
            return False
        except Exception as exc:
            self._note_failure(describe(exc), exc)
            return False
        if self._failing:
            log.info("heartbeat: announcing again")
        self._failing = False
        self.sent += 1
        return True

    def _note_failure(self, reason: str, exc: Exception | None = None) -> None:
        if not self._failing:
            log.warning(
                "heartbeat: not announced (%s); trying every %ss",
                reason,
                self._period_s,
                exc_info=exc,
            )
        self._failing = True

    async def _loop(self) -> None:
        # The first beat comes with the connection (the on-connect callback), or after one
        # period when the servers cannot be reached: none is tried before the first connect.
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._now.wait(), self._period_s)
            self._now.clear()
            await self.beat()
