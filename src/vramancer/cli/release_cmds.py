"""CLI commands: ``vramancer release prepare|status|logs|accept|reject|rollback|watch``.

The agent works on this machine's release directory (``[release] dir``) with the settings of
``--config``/``VRM_CONFIG``; with ``[release] vram`` its test step runs as a task of the daemon
at ``VRM_URL``. ``accept``, ``reject`` and ``rollback`` show what they will do and ask first;
``--yes`` skips the question, and without a terminal to ask on they need it. See
docs/release.md.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vramancer.cli.common import ConfigOpt, JsonOpt, console, emit, err_console, fail, load_settings
from vramancer.cli.tables import print_table
from vramancer.client import Client
from vramancer.errors import VramancerError
from vramancer.release.agent import Outcome, ReleaseAgent
from vramancer.release.steps import ClientTester

release_app = typer.Typer(
    help="Releases of a git branch: prepare a candidate, test it, accept or roll back.",
    no_args_is_help=True,
)

YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do it without asking.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Take a release whose build or tests failed anyway.")
]
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h)?\s*$")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root vramancer app."""
    app.add_typer(release_app, name="release")


def parse_interval(value: str) -> float:
    """``30s``, ``5m``, ``1h`` or seconds; at least 1 s."""
    found = _DURATION.match(value)
    if not found:
        raise typer.BadParameter(f"expected e.g. 30s, 5m or 1h (got {value!r})")
    seconds = float(found.group(1)) * {"s": 1, "m": 60, "h": 3600}[found.group(2) or "s"]
    if seconds < 1:
        raise typer.BadParameter(f"at least 1s (got {value!r})")
    return seconds


def _agent(config: Any) -> ReleaseAgent:
    settings = load_settings(config)
    tester = ClientTester(Client()) if settings.release.vram is not None else None
    return ReleaseAgent(settings.release, settings.data_dir, tester=tester)


def _run(fn: Any) -> Any:
    try:
        return fn()
    except VramancerError as exc:
        fail(exc.message)


def _render_outcome(data: dict[str, Any]) -> None:
    for step in data["steps"]:
        console.print(f"  {step}", markup=False)
    for note in data["notes"]:
        console.print(f"  {note}", highlight=False, soft_wrap=True, markup=False)
    result = data.get("result")
    if result:
        console.print(
            f"release {result['name']} ({result['commit'][:12]}): {result['state']}"
            + (f" — {result['error']}" if result.get("error") else ""),
            highlight=False,
            soft_wrap=True,
            markup=False,
        )


def _render_status(d: dict[str, Any]) -> None:
    if not d["configured"]:
        console.print(
            "no [release] repo configured: the agent follows nothing",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    else:
        console.print(
            f"{d['repo']} ({d['branch']}) -> {d['dir']}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    console.print(f"current:   {d['current'] or '-'}")
    console.print(f"candidate: {d['candidate'] or '-'}")
    if d["busy"]:
        console.print(f"busy: pid {d['busy'].get('pid')} ({d['busy'].get('action')})")
    table = Table("release", "commit", "state", "build", "test", "gpu")
    for r in d["releases"]:
        build, test = r.get("build") or {}, r.get("test") or {}
        table.add_row(
            escape(r["name"]),
            str(r.get("commit", ""))[:12],
            r.get("state", "?") + (" (stale)" if r.get("stale") else ""),
            _step(build),
            _step(test),
            test.get("gpu") or "",
        )
    # The name is what rollback and logs take: never cut.
    print_table(console, table, keys=("release", "state"), give_way=("commit",))


def _step(step: dict[str, Any]) -> str:
    if step.get("exit_code") is None:
        return "-"
    return f"exit {step['exit_code']} in {step.get('duration_s', 0):.1f}s"


@release_app.command("prepare")
def prepare(force: ForceOpt = False, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Clone the branch's head into a new release, build and test it: the candidate if both
    pass. Exit code 1 when they did not."""
    agent = _agent(config)
    outcome: Outcome = _run(lambda: agent.prepare(force=force))
    emit(outcome.as_dict(), json_out, _render_outcome)
    if outcome.record is not None and outcome.record.state.value != "passed" and not force:
        raise typer.Exit(1)


@release_app.command("status")
def status(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Current, candidate, and every release with its build and test results."""
    emit(_run(lambda: _agent(config).status()), json_out, _render_status)


@release_app.command("logs")
def logs(
    step: Annotated[str | None, typer.Argument(help="build or test (default: both).")] = None,
    release: Annotated[
        str | None,
        typer.Option("--release", help="A release, current or candidate (default: the candidate, "
                     "else the newest)."),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:  # fmt: skip
    """The build and test logs of a release."""
    data = _run(lambda: _agent(config).logs(release, step))

    def render(d: dict[str, str]) -> None:
        for name, text in d.items():
            if name == "release":
                continue
            console.rule(f"{d['release']}: {name}")
            sys.stdout.write(text)
            sys.stdout.flush()

    emit(data, json_out, render)


def _confirm(agent: ReleaseAgent, action: str, release: str | None, force: bool, yes: bool) -> None:
    plan = _run(lambda: agent.plan(action, release, force=force))
    if not plan.ok:
        fail(f"{action} refused: {plan.refused}")
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"{action} changes what is deployed: give --yes (there is no terminal to ask on)", 2)
    err_console.print(f"{action} will:", highlight=False, soft_wrap=True, markup=False)
    for line in plan.describe():
        err_console.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)
    if not typer.confirm("Go on?", default=False, err=True):
        fail(f"{action} not done", 1)


def _act(
    action: str, release: str | None, force: bool, yes: bool, config: Any, json_out: bool
) -> None:
    agent = _agent(config)
    _confirm(agent, action, release, force, yes)
    outcome = _run(lambda: agent.act(action, release, force=force))
    emit(outcome.as_dict(), json_out, _render_outcome)


@release_app.command("accept")
def accept(
    yes: YesOpt = False,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Make the candidate current (atomically)."""
    _act("accept", None, force, yes, config, json_out)


@release_app.command("reject")
def reject(yes: YesOpt = False, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Drop the candidate; current stays as it is."""
    _act("reject", None, False, yes, config, json_out)


@release_app.command("rollback")
def rollback(
    release: Annotated[
        str | None, typer.Argument(help="The release to go back to (default: the previous one).")
    ] = None,
    yes: YesOpt = False,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Point current back at an earlier release (default: the one current before)."""
    _act("rollback", release, force, yes, config, json_out)


@release_app.command("watch")
def watch(
    interval: Annotated[
        str, typer.Option("--interval", help="How often to look at the branch (30s, 5m, 1h).")
    ] = "5m",
    once: Annotated[bool, typer.Option("--once", help="Look once, then exit.")] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Prepare a candidate each time the branch moves (never accepts one)."""
    seconds = parse_interval(interval)
    agent = _agent(config)
    while True:
        try:
            head = agent.moved()
            if head is None:
                err_console.print(
                    f"{agent.settings.branch}: no new commit", highlight=False, soft_wrap=True
                )
            else:
                err_console.print(f"{agent.settings.branch} moved to {head[:12]}: preparing",
                                  highlight=False, soft_wrap=True, markup=False)  # fmt: skip
                emit(agent.prepare().as_dict(), json_out, _render_outcome)
        except VramancerError as exc:
            if once:
                fail(exc.message)
            err_console.print(
                f"error: {exc.message}", highlight=False, soft_wrap=True, markup=False
            )
        if once:
            return
        time.sleep(seconds)
