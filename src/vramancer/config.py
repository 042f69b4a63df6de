"""``Settings``: defaults < TOML file (``--config`` / ``VRM_CONFIG``) < ``VRM_*`` environment.

Every section is a pydantic model owned by its subsystem (``devices/settings.py`` ...) and forbids
unknown keys, so a typo stops start-up with a message naming the key. Nested keys can be set from
the environment with ``__`` (``VRM_MEMORY__TIERS__L4__CAPACITY=64MiB``).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from vramancer import config_hints as hints
from vramancer.arbiter.settings import ArbiterSettings
from vramancer.devices.settings import DevicesSettings
from vramancer.errors import ConfigError
from vramancer.fastpath.settings import FastpathSettings
from vramancer.gateway.settings import GatewaySettings
from vramancer.memory.settings import MemorySettings
from vramancer.models.settings import (
    GpuManagerSettings,
    ModelSpec,
    OllamaSettings,
    ProfilesSettings,
)
from vramancer.pool.settings import NatsSettings, default_node_name, node_name_problem
from vramancer.release.settings import ReleaseSettings
from vramancer.replication.settings import MIN_SECRET_BYTES, HaRole, HaSettings
from vramancer.resources.settings import ResourcesSettings
from vramancer.tasks.settings import TasksSettings
from vramancer.units import Size

DEFAULT_PORT = 8470
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"


class Role(StrEnum):
    """Roles, ordered: each includes the rights of the ones before it."""

    #: Reads state: devices, models, tiers, tasks.
    VIEWER = "viewer"
    #: Changes state: loads models, submits command tasks, switches profiles.
    OPERATOR = "operator"
    #: Everything, including forced eviction and HA rotation.
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _ROLE_RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_ROLE_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?")


def normalise_host(raw: str) -> str:
    """An ``allowed_hosts`` entry in the form Host headers are compared in: lower case, no
    trailing dot, IP addresses in their short form without brackets; ``*`` stays ``*``."""
    name = raw.strip().lower().removesuffix(".")
    if name == "*":
        return name
    try:
        return str(ipaddress.ip_address(name.removeprefix("[").removesuffix("]")))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(f"{raw!r} is not a host name or address (no scheme, port or path)")
    return name


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    #: Sustained requests per second per client (token or address).
    rate_limit_per_s: float = Field(default=100.0, gt=0)
    #: Burst a client may spend at once.
    rate_limit_burst: int = Field(default=200, ge=1)
    #: Largest request body accepted: the raw block bodies of ``PUT /v1/memory/blocks/*``.
    max_body: Size = 256 * 1024 * 1024
    #: Largest body of every other route (JSON bodies: tasks, allocations, profiles ...).
    max_json_body: Size = Field(default=1024 * 1024, gt=0)
    #: Host names (``Host`` header, any port) this server answers to besides the loopback
    #: ones (``localhost``, ``127.0.0.1``, ``[::1]``). With ``[auth] tokens`` and this list
    #: empty, any Host is accepted; ``"*"`` accepts any Host in every case.
    allowed_hosts: list[str] = Field(default_factory=list, max_length=1000)
    #: Proxies (addresses or CIDR networks) whose ``X-Forwarded-For``/``-Proto`` headers are
    #: believed. Empty: those headers are ignored and the peer address is the client.
    trusted_proxies: list[str] = Field(default_factory=list, max_length=1000)
    #: Open ``GET /v1/events`` streams at most, in all and per client (token, else address).
    max_event_streams: int = Field(default=64, ge=1)
    max_event_streams_per_client: int = Field(default=16, ge=1)
    #: An event stream whose client has read nothing for this long is dropped (slow consumer).
    event_stream_write_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    #: Log every HTTP request (``vramancer serve --access-log``); off: only answers of 400 and
    #: over are logged.
    access_log: bool = False

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        return [normalise_host(raw) for raw in hosts]

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, proxies: list[str]) -> list[str]:
        for raw in proxies:
            try:
                ipaddress.ip_network(raw.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{raw!r} is not an IP address or CIDR network") from None
        return [raw.strip() for raw in proxies]


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: token -> role. No tokens: loopback only, every caller admin.
    tokens: dict[str, Role] = Field(default_factory=dict)


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vramancer"


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "vramancer_config_file", default=None
)


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the TOML file chosen by ``Settings.load`` (or ``VRM_CONFIG``)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover - __call__ is used instead

    def __call__(self) -> dict[str, Any]:
        if self._path is None:
            return {}
        try:
            with open(self._path, "rb") as fh:
                return tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {self._path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {self._path} is not valid TOML: {exc}") from exc


class Settings(BaseSettings):
    """All of VRAMancer's configuration. Build with ``Settings.load()`` to read files and env."""

    model_config = SettingsConfigDict(
        env_prefix="VRM_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    #: This node's name in the pool (``NODE/gpu:N``); unique among the pool's nodes.
    node_name: str = Field(default_factory=lambda: default_node_name(socket.gethostname()))
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    tracing: bool = False
    disable_rate_limit: bool = False
    #: HA replication on (``VRM_HA_REPLICATION=1``): every acknowledged change is journaled
    #: and shipped to ``ha_peers`` (see docs/ha.md).
    ha_replication: bool = False
    #: The peers' API addresses, ``host1:8470,host2:8470``.
    ha_peers: str = Field(default="", max_length=4096)
    #: Size of a journal segment before it rotates.
    ha_journal_max: Size = 64 * 1024 * 1024
    #: The shared secret deltas are signed under (HKDF per UTC hour); at least 32 bytes.
    ha_secret: SecretStr | None = None
    #: The role this node starts in; a primary that finds a peer with a higher epoch starts
    #: as a standby.
    ha_role: HaRole = HaRole.PRIMARY
    #: A write is acknowledged only once a peer holds it (``[ha] sync_timeout_s``).
    ha_sync: bool = False
    #: Alias of ``[nats] url`` (``VRM_NATS_URL``).
    nats_url: str | None = Field(default=None, max_length=4096)

    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    devices: DevicesSettings = Field(default_factory=DevicesSettings)
    resources: ResourcesSettings = Field(default_factory=ResourcesSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    ollama: OllamaSettings = Field(default_factory=OllamaSettings)
    models: list[ModelSpec] = Field(default_factory=list)
    gpu_manager: GpuManagerSettings = Field(default_factory=GpuManagerSettings)
    profiles: ProfilesSettings = Field(default_factory=dict)
    arbiter: ArbiterSettings = Field(default_factory=ArbiterSettings)
    tasks: TasksSettings = Field(default_factory=TasksSettings)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    ha: HaSettings = Field(default_factory=HaSettings)
    fastpath: FastpathSettings = Field(default_factory=FastpathSettings)
    release: ReleaseSettings = Field(default_factory=ReleaseSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("node_name")
    @classmethod
    def _node_name(cls, value: str) -> str:
        problem = node_name_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _nats_alias(self) -> Settings:
        """``VRM_NATS_URL`` / ``nats_url`` is ``[nats] url`` when the section does not say."""
        if self.nats_url and self.nats.url is None:
            self.nats = self.nats.model_copy(update={"url": NatsSettings(url=self.nats_url).url})
        return self

    @model_validator(mode="after")
    def _check_ha(self) -> Settings:
        """HA on needs a secret of at least 32 bytes and well-formed peers."""
        if not self.ha_replication:
            return self
        problems = []
        secret = self.ha_secret.get_secret_value().encode() if self.ha_secret else b""
        if len(secret) < MIN_SECRET_BYTES:
            problems.append(
                f"ha_secret (VRM_HA_SECRET): HA replication needs a secret of at least "
                f"{MIN_SECRET_BYTES} bytes (got {len(secret)})"
            )
        for peer in self.peers:
            host, _, port = peer.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                problems.append(f"ha_peers (VRM_HA_PEERS): {peer!r} is not host:port")
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_across_sections(self) -> Settings:
        """What one section cannot check alone: ``[[models]]`` names are unique, and
        ``[gpu_manager]`` and ``[profiles.*]`` name configured models and profiles. Each line
        of the message names its key."""
        problems = model_problems(self.models, self.gpu_manager, self.profiles)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def peers(self) -> list[str]:
        return [p.strip() for p in self.ha_peers.split(",") if p.strip()]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        if path is None and os.environ.get("VRM_CONFIG"):
            path = Path(os.environ["VRM_CONFIG"])
        return (init_settings, env_settings, _TomlSource(settings_cls, path))

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Read defaults, the TOML file, then the environment; raise ``ConfigError`` if bad.

        A ``VRM_*`` variable that names no setting (``VRM_METRICS_PROT``) is an error too, as
        an unknown key in the file is: pydantic-settings would silently ignore it."""
        check_environment(os.environ)
        token = _config_file.set(Path(config_file) if config_file else None)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            path = Path(config_file) if config_file else None
            if path is None and os.environ.get("VRM_CONFIG"):
                path = Path(os.environ["VRM_CONFIG"])
            raise ConfigError(
                format_validation_error(exc, source=path, environ=os.environ)
            ) from None
        finally:
            _config_file.reset(token)


#: The model manager's built-in profiles (``models/registry.py``), present whenever
#: ``builtin_profiles`` is on (they place nothing until ``[gpu_manager]`` names a model);
#: ``idle`` always is.
BUILTIN_PROFILES = ("idle", "recording", "autopilot")


def model_problems(
    models: list[ModelSpec], gm: GpuManagerSettings, profiles: ProfilesSettings
) -> list[str]:
    """One line per cross-section problem of the model sections, each naming its key."""
    specs: dict[str, ModelSpec] = {}
    problems: list[str] = []
    for i, spec in enumerate(models):
        if spec.name in specs:
            problems.append(f"models.{i}.name: {spec.name!r} is declared twice")
        specs[spec.name] = spec
    known = ", ".join(sorted(specs)) or "none"
    for key, value in (("vlm_model", gm.vlm_model), ("clip_model", gm.clip_model)):
        if value is not None and value not in specs:
            problems.append(
                f"gpu_manager.{key}: {value!r} is not a configured model (models: {known})"
            )
    for profile, mapping in profiles.items():
        problems += _profile_problems(profile, mapping, specs, known)
    names = set(profiles) | {BUILTIN_PROFILES[0]}
    if gm.builtin_profiles:
        names.update(BUILTIN_PROFILES)
    if gm.initial_profile is not None and gm.initial_profile not in names:
        problems.append(
            f"gpu_manager.initial_profile: {gm.initial_profile!r} is not a profile "
            f"(profiles: {', '.join(sorted(names))})"
        )
    return problems


def _profile_problems(
    profile: str, mapping: Mapping[str, str], specs: Mapping[str, ModelSpec], known: str
) -> list[str]:
    problems = []
    for model, placement in mapping.items():
        found = specs.get(model)
        if found is None:
            problems.append(f"profiles.{profile}.{model}: not a configured model (models: {known})")
        elif placement == "cpu" and "cpu" not in found.allowed_devices:
            problems.append(
                f"profiles.{profile}.{model}: 'cpu', but the model's allowed_devices "
                f"{found.allowed_devices} exclude it"
            )
    return problems


#: ``VRM_*`` variables that are not settings: the CLI's, and those VRAMancer sets for its tasks.
OTHER_ENV_VARS = frozenset(
    {"VRM_CONFIG", "VRM_URL", "VRM_API_TOKEN", "VRM_TASK_ID", "VRM_TASK_ATTEMPT", "VRM_DEVICE",
     "VRM_SCRATCH_DIR"}
)  # fmt: skip


def check_environment(environ: Mapping[str, str]) -> None:
    """``ConfigError`` naming every ``VRM_*`` variable that is neither a setting
    (``VRM_<KEY>``, ``VRM_<SECTION>__<KEY>``, nested sections included) nor one of
    :data:`OTHER_ENV_VARS`, each with the closest name that is one."""
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("VRM_") or upper in OTHER_ENV_VARS:
            continue
        problem = hints.env_problem(Settings, name)
        if problem is None:
            continue
        if "did you mean" not in problem:  # a misspelt CLI or task variable (VRM_API_TOKN)
            close = difflib.get_close_matches(upper, sorted(OTHER_ENV_VARS), n=1)
            problem += f"; did you mean {close[0]}?" if close else ""
        lines.append(problem)
    if lines:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))


def _read_toml(path: Path | None) -> dict[str, Any]:
    try:
        with open(path, "rb") if path is not None else contextlib.nullcontext(None) as fh:
            return tomllib.load(fh) if fh is not None else {}
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def format_validation_error(
    exc: ValidationError,
    *,
    source: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """One line per problem: the key as it was written (the ``VRM_*`` variable, or the key's
    spelling in the ``source`` file, named), what was expected, what was given; an unknown key
    gets the closest known one."""
    toml = _read_toml(source)
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        if not loc:  # a check across keys: its message names them
            lines.append(str(err["msg"]).removeprefix("Value error, "))
            continue
        env = hints.env_var(environ or {}, loc)
        written = None if env else hints.as_written(toml, loc)
        key = env or ".".join(map(str, written or loc))
        where = f" (in {source})" if written else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key{hints.key_hint(Settings, written or loc)}{where}")
            continue
        given = err.get("input")
        msg = str(err["msg"]).removeprefix("Value error, ")
        shown = "" if isinstance(given, dict | list) or "got " in msg else f" (got {given!r})"
        lines.append(f"{key}: {msg}{shown}{where}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
