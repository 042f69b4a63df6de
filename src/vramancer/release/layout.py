"""The release directory on disk, and the moves that keep it whole.

::

    <dir>/releases/<UTC time>-<short sha>/   one release: checkout/, logs/, result.json and
                                             the marker file .vramancer-release
    <dir>/current -> releases/<name>          the release in use
    <dir>/candidate -> releases/<name>        the release waiting to be accepted or rejected
    <dir>/.lock                               held (flock) by the agent at work, names it

A link is switched by making a new symlink under a temporary name then ``os.replace`` onto the
link: a reader (or a crash) sees the old release or the new one, never none or half of one. A
leftover temporary link (the agent was killed between the two steps) is removed by the next
agent. Only directories that carry the marker file are releases: the agent never removes
anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from vramancer.errors import Conflict, NotFound
from vramancer.release.records import (
    LINK_NAMES,
    RELEASE_NAME,
    DeployView,
    ReleaseInfo,
    ReleaseRecord,
)
from vramancer.release.settings import ReleaseSettings

#: Written in every release directory the agent makes; nothing without it is ever removed.
MARKER = ".vramancer-release"
#: The prefix of a link's temporary name while it is switched.
TEMP_PREFIX = ".switch-"


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.releases = self.root / "releases"
        self.lock_path = self.root / ".lock"

    def link(self, name: str) -> Path:
        return self.root / name

    def release_dir(self, name: str) -> Path:
        return self.releases / name

    def checkout(self, name: str) -> Path:
        return self.release_dir(name) / "checkout"

    def log(self, name: str, step: str) -> Path:
        return self.release_dir(name) / "logs" / f"{step}.log"

    def result(self, name: str) -> Path:
        return self.release_dir(name) / "result.json"

    def is_release(self, name: str) -> bool:
        return bool(RELEASE_NAME.match(name)) and (self.release_dir(name) / MARKER).is_file()

    # -- records ------------------------------------------------------------------------------

    def read(self, name: str) -> ReleaseRecord | None:
        try:
            return ReleaseRecord.from_dict(json.loads(self.result(name).read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def write(self, record: ReleaseRecord) -> None:
        path = self.result(record.name)
        tmp = path.with_name(f".result.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record.as_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    def names(self) -> list[str]:
        """The releases, oldest first (their names start with their UTC time)."""
        try:
            entries = os.listdir(self.releases)
        except FileNotFoundError:
            return []
        return sorted(n for n in entries if self.is_release(n))

    def target(self, link: str) -> str | None:
        """The release ``link`` points at (None: no link, or not at a release)."""
        try:
            raw = os.readlink(self.link(link))
        except OSError:
            return None
        name = Path(raw).name
        return name if self.is_release(name) else None

    def view(self, alive: Callable[[int], bool]) -> DeployView:
        infos = []
        for name in self.names():
            record = self.read(name)
            if record is None:
                continue
            stale = record.state.in_progress and not (record.pid is not None and alive(record.pid))
            infos.append(
                ReleaseInfo(
                    name,
                    record.state,
                    record.accepted_at,
                    record.forced,
                    stale=stale,
                    commit=record.commit,
                )
            )
        return DeployView(tuple(infos), self.target("current"), self.target("candidate"))

    # -- moves --------------------------------------------------------------------------------

    def switch(self, link: str, release: str) -> None:
        """Point ``link`` at ``release`` atomically (symlink to a temporary name, replace)."""
        tmp = self.root / f"{TEMP_PREFIX}{link}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(os.path.join("releases", release), tmp)
        os.replace(tmp, self.link(link))
        _fsync_dir(self.root)

    def unlink(self, link: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.link(link).unlink()
        _fsync_dir(self.root)

    def remove(self, name: str) -> None:
        """Remove a release's directory: only one the agent made (it holds the marker)."""
        if not self.is_release(name):
            raise Conflict(f"{self.release_dir(name)} is not a release the agent made; left alone")
        shutil.rmtree(self.release_dir(name))

    def clean_temps(self) -> list[str]:
        """Remove temporary links a killed agent left behind; their names."""
        removed = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(self.root):
                path = self.root / entry
                if entry.startswith(TEMP_PREFIX) and path.is_symlink():
                    path.unlink()
                    removed.append(entry)
        return removed

    def resolve(self, name: str) -> Path:
        """The checkout of ``name`` (``current``, ``candidate`` or a release), resolved now:
        the real directory, so a later switch does not change it."""
        release = self.target(name) if name in LINK_NAMES else name
        if release is None:
            raise NotFound(f"there is no {name} release in {self.root}", release=name)
        if not self.is_release(release):
            raise NotFound(f"no release {release!r} in {self.releases}", release=name)
        return Path(os.path.realpath(self.checkout(release)))


class Releases:
    """What the task service needs (``tasks.ports.ReleasesPort``): a release's checkout."""

    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)

    def checkout(self, name: str) -> Path:
        return self.layout.resolve(name)


def deploy_dir(settings: ReleaseSettings, data_dir: Path) -> Path:
    """``[release] dir``, default ``<data dir>/deploy``."""
    return Path(settings.dir).expanduser() if settings.dir else Path(data_dir) / "deploy"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AgentLock:
    """One agent at a time on a release directory: ``flock`` on ``<dir>/.lock``, which then
    names its holder (pid, action, since). A second agent waits ``timeout_s`` then raises
    ``Conflict`` naming the holder."""

    def __init__(self, path: Path, action: str, *, timeout_s: float = 0.0) -> None:
        self.path = path
        self.action = action
        self.timeout_s = timeout_s
        self._fd: int | None = None

    def __enter__(self) -> AgentLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    found = read_holder(self.path)
                    os.close(fd)
                    raise Conflict(
                        f"another release agent is at work in {self.path.parent}: "
                        f"{describe_holder(found)}; try again when it is done",
                        holder=found,
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "action": self.action, "since": time.time()}
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def read_holder(path: Path) -> dict[str, Any] | None:
    """Who holds the lock now (None: nobody)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raw = os.pread(fd, 4096, 0)
            try:
                holder = json.loads(raw)
            except ValueError:
                holder = {}
            return holder if isinstance(holder, dict) else {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an agent (not yet named)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else "?"
    return f"pid {holder.get('pid')} ({holder.get('action')}) since {when}"
