"""The release agent: the executor of ``policy.py``'s plans on the release directory.

``prepare`` clones the branch's head into a new release, builds and tests it, and makes it
the candidate when both passed; ``accept`` makes the candidate current; ``reject`` drops it;
``rollback`` points current back at an earlier release; old releases are pruned past
``[release] keep``. Every action that changes the directory holds the agent lock
(``layout.AgentLock``); reading the status does not.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramancer.clock import Clock, SystemClock
from vramancer.errors import Conflict, InvalidInput, NotFound, VramancerError
from vramancer.release import policy
from vramancer.release.layout import (
    MARKER,
    AgentLock,
    Layout,
    deploy_dir,
    pid_alive,
    read_holder,
)
from vramancer.release.policy import Plan, StepKind
from vramancer.release.records import (
    RELEASE_NAME,
    DeployView,
    ReleaseRecord,
    ReleaseState,
    StepResult,
)
from vramancer.release.settings import ReleaseSettings
from vramancer.release.steps import TaskTester, run_shell, step_env

#: Longest a git command (clone, ls-remote) may take.
GIT_TIMEOUT_S = 600.0
STEPS = ("build", "test")


class NoRepository(Conflict):
    """``[release] repo`` is not set (409 ``release_not_configured``)."""

    code = "release_not_configured"


class Refused(Conflict):
    """The policy refused the action (409 ``release_refused``): the message says why."""

    code = "release_refused"


class GitFailed(VramancerError):
    """A git command failed (502-like: the repository, not the caller)."""

    code = "git_failed"
    http_status = 502


_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


def shown_repo(repo: str | None) -> str | None:
    """``repo`` as status shows it: a password or token in a URL is hidden."""
    return _USERINFO.sub(r"\1<redacted>@", repo) if repo else repo


def release_name(when: float, commit: str) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when)) + "-" + commit[:7]


@dataclass
class Outcome:
    """What an action did: the plan's steps, the release concerned, and notes."""

    action: str
    release: str | None = None
    steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    record: ReleaseRecord | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "release": self.release,
            "steps": self.steps,
            "notes": self.notes,
            "result": self.record.as_dict() if self.record else None,
        }


def _tail(path: Path, max_bytes: int | None) -> str:
    try:
        with open(path, "rb") as fh:
            if max_bytes is not None:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - max_bytes))
            return fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


class ReleaseAgent:
    def __init__(
        self,
        settings: ReleaseSettings,
        data_dir: Path,
        *,
        clock: Clock | None = None,
        tester: TaskTester | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.layout = Layout(deploy_dir(settings, data_dir))
        self.clock = clock or SystemClock()
        self.tester = tester
        self.environ = os.environ if environ is None else environ
        #: Set to stop a prepare under way (its running step is killed; the release fails).
        self.stop_event = threading.Event()

    # -- reading ------------------------------------------------------------------------------

    def view(self) -> DeployView:
        return self.layout.view(pid_alive)

    def status(self) -> dict[str, Any]:
        """The links, every release's result (newest first), and the agent at work."""
        view = self.view()
        releases = []
        for info in reversed(view.releases):
            record = self.layout.read(info.name)
            entry: dict[str, Any] = record.as_dict() if record else {"name": info.name}
            entry["stale"] = info.stale
            if "repo" in entry:
                entry["repo"] = shown_repo(entry["repo"])
            entry["path"] = str(self.layout.release_dir(info.name))
            releases.append(entry)
        return {
            "configured": self.settings.repo is not None,
            "repo": shown_repo(self.settings.repo),
            "branch": self.settings.branch,
            "dir": str(self.layout.root),
            "current": view.current,
            "candidate": view.candidate,
            "busy": read_holder(self.layout.lock_path),
            "releases": releases,
        }

    def logs(
        self, release: str | None = None, step: str | None = None, *, max_bytes: int | None = None
    ) -> dict[str, str]:
        """The build and test logs (``step``: only that one) of ``release`` (default: the
        candidate, else the newest release), with ``release``: the release's name.
        ``max_bytes``: only the end of each log."""
        if step is not None and step not in STEPS:
            raise InvalidInput(f"step must be build or test (got {step!r})", field="step")
        name = self._name(release)
        out = {"release": name}
        for which in (step,) if step else STEPS:
            out[which] = _tail(self.layout.log(name, which), max_bytes)
        return out

    def _name(self, release: str | None) -> str:
        view = self.view()
        if release in (None, "candidate"):
            name = view.candidate or (view.releases[-1].name if view.releases else None)
        elif release == "current":
            name = view.current
        else:
            name = release
        if name is None or view.get(name) is None:
            raise NotFound(f"no release {release or ''}".strip() + f" in {self.layout.root}")
        return name

    # -- git ----------------------------------------------------------------------------------

    def require_repo(self) -> str:
        if self.settings.repo is None:
            raise NoRepository("[release] repo is not set: the agent has no repository to follow")
        return self.settings.repo

    def _git(self, *args: str, cwd: Path | None = None) -> str:
        env = {k: v for k, v in self.environ.items() if not k.startswith("VRM_")}
        env["GIT_TERMINAL_PROMPT"] = "0"
        try:
            proc = subprocess.run(
                ["git", *args],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GitFailed(f"git {args[0]}: {exc}") from None
        if proc.returncode != 0:
            raise GitFailed(f"git {args[0]} failed: {shown_repo(proc.stderr.strip()[-2000:])}")
        return proc.stdout

    def head(self) -> str:
        """The commit at the head of the followed branch, as the repository says now."""
        branch = self.settings.branch
        out = self._git("ls-remote", "--", self.require_repo(), f"refs/heads/{branch}")
        for line in out.splitlines():
            sha, _, ref = line.partition("\t")
            if ref == f"refs/heads/{branch}":
                return sha
        raise GitFailed(f"branch {branch!r} is not in {shown_repo(self.require_repo())}")

    def moved(self) -> str | None:
        """The head commit when no release was made of it yet (what ``watch`` prepares)."""
        head = self.head()
        return head if policy.plan_prepare(self.view(), head).ok else None

    # -- actions ------------------------------------------------------------------------------

    def _lock(self, action: str) -> AgentLock:
        return AgentLock(self.layout.lock_path, action, timeout_s=self.settings.lock_timeout_s)

    def prepare(self, *, force: bool = False) -> Outcome:
        """Clone the branch's head into a new release, build and test it; it becomes the
        candidate when both passed (a failed one only with ``force``)."""
        repo = self.require_repo()
        with self._lock("prepare"):
            self.layout.clean_temps()
            commit = self.head()
            name = release_name(self.clock.time(), commit)
            if self.layout.release_dir(name).exists():
                raise Conflict(f"release {name} already exists")
            record = ReleaseRecord(
                name=name,
                commit=commit,
                branch=self.settings.branch,
                repo=repo,
                created_at=self.clock.time(),
                state=ReleaseState.CLONING,
                pid=os.getpid(),
            )
            self.layout.releases.mkdir(parents=True, exist_ok=True)
            self.layout.release_dir(name).mkdir()
            (self.layout.release_dir(name) / MARKER).write_text(
                "made by the VRAMancer release agent\n"
            )
            (self.layout.release_dir(name) / "logs").mkdir()
            self.layout.write(record)
            try:
                self._build_and_test(record)
            except BaseException as exc:
                record.state, record.pid = ReleaseState.FAILED, None
                record.error = record.error or f"the agent stopped: {type(exc).__name__}: {exc}"
                self.layout.write(record)
                raise
            outcome = Outcome("prepare", name, record=record)
            plan = policy.plan_candidate(self.view(), name, force=force)
            if plan.ok:
                if force and record.state is not ReleaseState.PASSED:
                    record.forced = True
                    self.layout.write(record)
                self._apply(plan, outcome)
            else:
                outcome.notes.append(f"not made the candidate: {plan.refused}")
            self._prune(outcome)
            return outcome

    def _build_and_test(self, record: ReleaseRecord) -> None:
        name, checkout = record.name, self.layout.checkout(record.name)
        try:
            self._git("clone", "--quiet", "--no-checkout", "--branch", record.branch,
                      "--", record.repo, str(checkout))  # fmt: skip
            self._git("checkout", "--quiet", "--detach", record.commit, cwd=checkout)
        except GitFailed as exc:
            record.state, record.pid, record.error = ReleaseState.FAILED, None, exc.message
            self.layout.write(record)
            return
        env = step_env(self.environ, name, checkout)
        timeout = self.settings.step_timeout_s
        for step in STEPS:
            command = getattr(self.settings, step)
            if command is None:
                setattr(record, step, StepResult(exit_code=0, error="no command configured"))
                continue
            record.state = ReleaseState.BUILDING if step == "build" else ReleaseState.TESTING
            self.layout.write(record)
            log = self.layout.log(name, step)
            if step == "test" and self.settings.vram is not None:
                if self.tester is None:
                    raise Conflict("[release] vram is set but no daemon runs the test as a task")
                result = self.tester.run(
                    command,
                    cwd=checkout,
                    vram=self.settings.vram,
                    timeout_s=timeout,
                    log=log,
                    stop=self.stop_event,
                )
            else:
                result = run_shell(
                    command, cwd=checkout, env=env, log=log, timeout_s=timeout, stop=self.stop_event
                )
            setattr(record, step, result)
            if not result.ok:
                record.state, record.pid = ReleaseState.FAILED, None
                record.error = f"{step} failed" + (
                    f": {result.error}" if result.error else f" (exit code {result.exit_code})"
                )
                self.layout.write(record)
                return
        record.state, record.pid = ReleaseState.PASSED, None
        self.layout.write(record)

    def plan(self, action: str, release: str | None = None, *, force: bool = False) -> Plan:
        """What ``action`` (accept, reject, rollback, prune) would do now."""
        view = self.view()
        if action == "accept":
            return policy.plan_accept(view, force=force)
        if action == "reject":
            return policy.plan_reject(view)
        if action == "rollback":
            if release is not None and not RELEASE_NAME.match(release):
                raise InvalidInput(
                    f"release must be a release's name, <UTC time>-<short sha> (got {release!r})",
                    field="release",
                )
            return policy.plan_rollback(view, release, force=force)
        if action == "prune":
            return policy.plan_prune(view, self.settings.keep)
        raise InvalidInput(f"unknown action {action!r}", field="action")

    def act(self, action: str, release: str | None = None, *, force: bool = False) -> Outcome:
        """Apply ``action`` (accept, reject, rollback) under the lock."""
        with self._lock(action):
            self.layout.clean_temps()
            plan = self.plan(action, release, force=force)
            if not plan.ok:
                raise Refused(f"{action} refused: {plan.refused}", action=action)
            outcome = Outcome(action)
            self._apply(plan, outcome)
            self._prune(outcome)
            return outcome

    def prune(self) -> Outcome:
        with self._lock("prune"):
            outcome = Outcome("prune")
            self._prune(outcome)
            return outcome

    def _prune(self, outcome: Outcome) -> None:
        plan = policy.plan_prune(self.view(), self.settings.keep)
        for step in plan.steps:
            self.layout.remove(step.target)
            outcome.notes.append(step.describe())

    def _apply(self, plan: Plan, outcome: Outcome) -> None:
        for step in plan.steps:
            if step.kind is StepKind.LINK:
                assert step.value is not None
                if step.target == "current":
                    self._mark_accepted(step.value)
                self.layout.switch(step.target, step.value)
                outcome.release = step.value
            elif step.kind is StepKind.UNLINK:
                outcome.release = outcome.release or self.layout.target(step.target)
                self.layout.unlink(step.target)
            elif step.kind is StepKind.MARK:
                record = self.layout.read(step.target)
                if record is not None and step.value is not None:
                    record.state = ReleaseState(step.value)
                    self.layout.write(record)
                outcome.release = step.target
            outcome.steps.append(step.describe())

    def _mark_accepted(self, name: str) -> None:
        record = self.layout.read(name)
        if record is None:
            return
        record.accepted_at = self.clock.time()
        if record.state is not ReleaseState.PASSED:
            record.forced = True
        self.layout.write(record)
