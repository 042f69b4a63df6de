"""CLI commands for tasks: ``submit``, ``watch``, ``tasks list|cancel|logs``, ``validate``.

They talk to a running server (``VRM_URL``, ``VRM_API_TOKEN``). A submitted command runs in
the directory it was submitted from unless ``--cwd`` or ``--scratch`` says otherwise::

    vramancer submit --gpu 0 --vram 4GiB --timeout 600 --retries 1 --wait -- python train.py
    vramancer watch 3f2a...          # follow state and output until the task ends
    vramancer validate               # end-to-end self-test of the scheduler (PASS / FAIL)

``submit --wait`` and ``watch`` exit with 0 when the task ends done, with the task's exit code
when it failed with one, else 1.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import closing
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.table import Table

from vramancer.cli import forms
from vramancer.cli.common import Api, JsonOpt, call, console, emit, err_console, fail
from vramancer.cli.parsing import CommandAfterDashes
from vramancer.cli.tables import print_table
from vramancer.cli.tasks_validate import run_validation
from vramancer.client import task_workdir
from vramancer.errors import InvalidInput
from vramancer.units import format_size

tasks_app = typer.Typer(help="GPU tasks: list, cancel, logs.", no_args_is_help=True)

#: The most characters of a task's command ``tasks list`` shows.
MAX_WHAT = 200
#: How often ``watch`` polls the server.
POLL_S = 0.25
_TERMINAL = {"done", "failed", "cancelled"}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root vramancer app."""
    app.command("submit", cls=CommandAfterDashes)(submit)
    app.command("watch")(watch)
    app.command("validate")(validate)
    app.add_typer(tasks_app, name="tasks")


def _task_path(task_id: str, action: str) -> str:
    return f"/api/tasks/{quote(task_id, safe='')}/{action}"


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env: expected KEY=VALUE (got {pair!r})", code=2)
        env[key] = value
    return env


def _workdir(cwd: str | None, scratch: bool) -> str | None:
    try:
        return task_workdir(cwd, scratch)
    except InvalidInput:
        fail("--scratch and --cwd: give one of them", code=2)


def submit(
    command: Annotated[list[str], typer.Argument(help="The command and its arguments, after --.")],
    gpu: Annotated[int | None, typer.Option(help="Pin to this GPU (index).", min=0)] = None,
    node: Annotated[
        str | None, typer.Option(help="Pin to this node of the pool (vramancer nodes).")
    ] = None,
    vram: Annotated[
        str | None, typer.Option(help="VRAM it needs, e.g. 4GiB.", metavar="SIZE")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds before it is killed.")] = None,
    retries: Annotated[int | None, typer.Option(help="Retries after a failure.", min=0)] = None,
    priority: Annotated[
        str | None,
        typer.Option(
            help="background, normal, high or user_facing, or a number 0..1000.",
            metavar="PRIORITY",
        ),
    ] = None,
    shell: Annotated[bool, typer.Option("--shell", help="Run COMMAND with sh -c.")] = False,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", help="An environment variable (repeat).", metavar="KEY=VALUE"),
    ] = None,
    cwd: Annotated[
        str | None,
        typer.Option(
            help="Working directory (default: the current one; it must exist where the task runs)."
        ),
    ] = None,
    scratch: Annotated[
        bool,
        typer.Option(
            "--scratch",
            help="Run in an empty scratch directory the daemon makes (removed at the end).",
        ),
    ] = False,
    key: Annotated[str | None, typer.Option("--key", help="Idempotency key.")] = None,
    release: Annotated[
        str | None,
        typer.Option(
            "--release",
            help="Run in a release's checkout: current, candidate or a release (docs/release.md).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="A managed model it needs: loaded first, held while it runs."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow state and output to the end.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Submit a command as a task; prints its id (and follows it with --wait)."""
    body: dict[str, Any] = (
        {"type": "shell", "shell": " ".join(command)}
        if shell
        else {"type": "cmd", "cmd": list(command)}
    )
    if vram is not None:
        body["vram"] = forms.size(vram, "--vram")
    if priority is not None:
        body["priority"] = forms.priority_word(priority).value
    options = {
        "gpu": gpu,
        "node": node,
        "timeout": timeout,
        "max_retries": retries,
        "cwd": None if release is not None and cwd is None else _workdir(cwd, scratch),
        "release": release,
        "idempotency_key": key,
        "model": model,
    }
    body.update({k: v for k, v in options.items() if v is not None})
    if env:
        body["env"] = _env_pairs(env)
    with closing(Api()) as api:
        result = call(lambda: api.post("/api/tasks/submit", json=body))
        task_id = result["task_id"]
        if not wait:
            emit(result, json_out, lambda r: console.print(r["task_id"], highlight=False))
            return
        if not json_out:
            console.print(task_id, highlight=False)
        try:
            _follow(api, task_id, json_out)
        except KeyboardInterrupt:
            _detached(task_id)


def _detached(task_id: str) -> NoReturn:
    """Ctrl-C stops following, not the task: say so, and how to stop it; exit 130 (SIGINT)."""
    sys.stderr.write(
        f"\nstopped following; task {task_id} still runs on the server "
        f"(follow it again with `vramancer watch {task_id}`, "
        f"stop it with `vramancer tasks cancel {task_id}`)\n"
    )
    sys.stderr.flush()
    raise typer.Exit(130)


def watch(
    task_id: Annotated[
        str, typer.Argument(help="The task id, or its first characters (at least 4, unique).")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Follow a task's state and output until it ends."""
    with closing(Api()) as api:
        _follow(api, task_id, json_out)


def _follow(api: Api, task_id: str, json_out: bool) -> None:
    """Poll state and new output; print changes; exit with the task's outcome."""
    offsets = {"stdout": 0, "stderr": 0}
    attempt = -1
    state = ""
    why = None
    while True:
        status = _status(api, task_id)
        task_id = status["task_id"]  # the full id, when a shortened one was given
        # a waiting task's reason is recomputed on every read: show it again when it changes
        if status["state"] != state or status.get("waiting_reason") != why:
            state = status["state"]
            why = status.get("waiting_reason")
            if not json_out:
                where = f" on {status['device']}" if status.get("device") else ""
                note = f" ({status['error']})" if status.get("error") else ""
                # One line whatever the width (a pipe is 80 columns to rich), and the error's
                # brackets ([tasks] ...) printed as they are.
                line = escape(f"{state}{where}{note}")
                err_console.print(f"[dim]{line}[/]", highlight=False, soft_wrap=True)
        if status["attempts"] != attempt:
            if not json_out and attempt > 0:  # what the previous attempt wrote since last time
                _print_new_output(api, task_id, attempt, offsets)
            attempt = status["attempts"]
            offsets = {"stdout": 0, "stderr": 0}
        if not json_out and attempt > 0:
            _print_new_output(api, task_id, attempt, offsets)
        if state in _TERMINAL:
            break
        time.sleep(POLL_S)
    if json_out:
        emit(status, True)
    if state == "done":
        return
    raise typer.Exit(status.get("exit_code") or 1)


def _status(api: Api, task_id: str) -> dict[str, Any]:
    status: dict[str, Any] = call(lambda: api.get("/api/tasks/status", params={"task_id": task_id}))
    return status


def _print_new_output(api: Api, task_id: str, attempt: int, offsets: dict[str, int]) -> None:
    params = {"attempt": attempt, "stdout_offset": offsets["stdout"]}
    params["stderr_offset"] = offsets["stderr"]
    logs = call(lambda: api.get(_task_path(task_id, "logs"), params=params))
    if logs["stdout"]:
        sys.stdout.write(logs["stdout"])
        sys.stdout.flush()
    if logs["stderr"]:
        sys.stderr.write(logs["stderr"])
        sys.stderr.flush()
    offsets["stdout"] = logs["stdout_next"]
    offsets["stderr"] = logs["stderr_next"]


@tasks_app.command("list")
def list_tasks(
    state: Annotated[str | None, typer.Option(help="Only tasks in this state.")] = None,
    limit: Annotated[int, typer.Option(help="Tasks per page.", min=1, max=1000)] = 20,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Recent tasks, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if state:
        params["state"] = state
    if cursor:
        params["cursor"] = cursor
    with closing(Api()) as api:
        page = call(lambda: api.get("/api/tasks/history", params=params))

    def render(data: dict[str, Any]) -> None:
        table = Table(
            "id",
            "type",
            "state",
            "tries",
            "device",
            "vram",
            "exit",
            "what",
        )
        for t in data["tasks"]:
            spec = t["spec"]
            what = " ".join(spec.get("cmd") or []) or spec.get("shell") or spec.get("python") or ""
            what = " ".join(what[:MAX_WHAT].split())
            if t.get("system"):
                what = "(daemon maintenance)"
            table.add_row(
                t["task_id"],
                t["type"],
                t["state"],
                str(t["attempts"]),
                t["device"] or "–",
                format_size(t["vram_bytes"]) if t["vram_bytes"] else "–",
                "–" if t["exit_code"] is None else str(t["exit_code"]),
                what,
            )
        # The id is what the other commands take, the state what the user looks for.
        print_table(console, table, keys=("id", "state"), give_way=("what",))
        for t in data["tasks"]:
            if t.get("waiting_reason"):
                console.print(f"{t['task_id']}: {escape(t['waiting_reason'])}", highlight=False)
        if data["next_cursor"]:
            console.print(f"more: --cursor {data['next_cursor']}", highlight=False)

    emit(page, json_out, render)


@tasks_app.command("cancel")
def cancel(
    task_id: Annotated[
        str, typer.Argument(help="The task id, or its first characters (at least 4, unique).")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Cancel a task (a running one is killed)."""
    with closing(Api()) as api:
        record = call(lambda: api.post(_task_path(task_id, "cancel")))
    emit(record, json_out, lambda r: console.print(f"{r['task_id']}: cancel requested"))


@tasks_app.command("logs")
def logs(
    task_id: Annotated[
        str, typer.Argument(help="The task id, or its first characters (at least 4, unique).")
    ],
    attempt: Annotated[
        int | None, typer.Option(help="Which attempt (1 = the first); default: the latest.", min=1)
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """stdout and stderr of one attempt of a task (default: the latest)."""
    params = {} if attempt is None else {"attempt": attempt}
    with closing(Api()) as api:
        data = call(lambda: api.get(_task_path(task_id, "logs"), params=params))

    def render(d: dict[str, Any]) -> None:
        sys.stdout.write(d["stdout"])
        sys.stderr.write(d["stderr"])
        if not d["stdout"] and not d["stderr"]:
            err_console.print("[dim](no output)[/]")
        if d["truncated"]:
            err_console.print("[dim](output truncated)[/]")

    emit(data, json_out, render)


def validate(
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds allowed per step (the noop step also waits out the server's "
            "maintenance_max_wait_s on a busy host)."
        ),
    ] = 60.0,
    json_out: JsonOpt = False,
) -> None:
    """End-to-end self-test against the running server; prints PASS or FAIL with the reason."""
    api = Api()
    api.close()
    report = run_validation(api.url, os.environ.get("VRM_API_TOKEN"), step_timeout_s=timeout)
    if json_out:
        emit(report, True)
    else:
        for step in report["steps"]:
            mark = "[green]ok[/]  " if step["ok"] else "[red]FAIL[/]"
            console.print(
                f"{mark} {escape(step['name'])} ({step['seconds']:.1f} s)", highlight=False
            )
        if report["result"] == "PASS":
            console.print(f"PASS: {report['message']}", highlight=False, markup=False)
        else:
            console.print(f"FAIL: {report['message']}", highlight=False, markup=False)
    if report["result"] != "PASS":
        raise typer.Exit(1)
