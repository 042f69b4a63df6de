"""How the command line is written, as a user types it: the program of ``submit`` after
``--``, help that shows what the parser takes, one way to write sizes and priorities, tables
that fit the terminal."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import typer._click as click
from typer.testing import CliRunner

import vramancer
from tests.helpers import OPERATOR_SIM_GPU_CONFIG, ServerProcess, operator_env, running_server
from vramancer.cli.main import app
from vramancer.cli.system_cmds import optimize_summary

CONFIG = (
    OPERATOR_SIM_GPU_CONFIG
    + """
[[models]]
name = "toy-small-embedding-model-for-tables"
backend = "torch"
factory = "tests.unit.models.tiny:tiny"
vram = "500MiB"
"""
)

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp: Path = tmp_path_factory.mktemp("cli-forms")
    with running_server(tmp, CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"}) as proc:
        yield proc


def env_for(server: ServerProcess) -> dict[str, str]:
    return operator_env(server.url)


def plain(text: str) -> str:
    """``text`` without rich's boxes, on one line."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_an_option_of_the_program_says_to_put_it_after_dashes() -> None:
    result = runner.invoke(app, ["submit", "--vram", "2GiB", "python", "-c", "print(1)"])
    assert result.exit_code == 2
    message = plain(result.stderr)
    assert "No such option: -c" in message
    assert "put the command after `--`: vramancer submit --vram 2GiB -- python -c 'print(1)'" in (
        message
    )
    # Short options run together, and --opt=value before the program.
    result = runner.invoke(app, ["submit", "--gpu=0", "ls", "-la"])
    assert "vramancer submit --gpu=0 -- ls -la" in plain(result.stderr)


def test_a_typo_in_submits_own_options_is_not_blamed_on_the_program() -> None:
    result = runner.invoke(app, ["submit", "--vram", "2GiB", "--wiat", "python"])
    assert result.exit_code == 2
    message = plain(result.stderr)
    assert "No such option: --wiat" in message and "--`" not in message


def commands(group: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(group, "commands", {}).items():
        yield from commands(sub, (*path, name))


def test_help_shows_what_the_parser_takes() -> None:
    seen = 0
    for path in commands(typer.main.get_command(app)):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        types = re.findall(
            r"<(?:bool|str|int|float|list\[.*?\]|\w+ range|path|file)>", result.stdout
        )
        assert types == [], (path, types)
        seen += 1
    assert seen > 20
    submit = runner.invoke(app, ["submit", "--help"], env={"COLUMNS": "200"}).stdout
    assert re.search(r"--vram +SIZE +VRAM it needs", submit)
    assert re.search(r"--env +KEY=VALUE +An environment variable", submit)
    assert re.search(r"--wait +Follow state", submit)  # a flag: no value shown
    assert re.search(r"--timeout +NUMBER", submit) and re.search(r"--node +TEXT", submit)
    # What help shows is what the parser takes: a flag alone, not `--json true`.
    refused = runner.invoke(app, ["tasks", "list", "--json", "true"])
    assert refused.exit_code == 2 and "unexpected extra argument" in plain(refused.stderr)


@pytest.mark.parametrize(
    ("size", "mib"), [(["--size", "2GiB"], 2048.0), (["--size-mb", "2048"], 2048.0)]
)
def test_can_load_takes_a_size_as_vram_does(
    server: ServerProcess, size: list[str], mib: float
) -> None:
    result = runner.invoke(app, ["can-load", "m", *size, "--json"], env=env_for(server))
    assert result.exit_code == 0, result.output
    assert "2.0 GiB needed" in json.loads(result.stdout)["reason"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: --size: the expected size is required"),
        (["--size", "2XB"], "error: --size: expected an integer number of bytes"),
        (["--size", "1GiB", "--size-mb", "3"], "error: --size and --size-mb: give one of them"),
        (["--size-mb", "-1"], "error: --size-mb: must be 0 or more"),
    ],
)
def test_can_load_names_the_size_option_it_refuses(
    server: ServerProcess, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["can-load", "m", *args], env=env_for(server))
    assert result.exit_code == 2 and result.stderr.startswith(message), result.output


def test_a_priority_is_a_word_or_a_number_everywhere(server: ServerProcess) -> None:
    env = env_for(server)
    put = runner.invoke(
        app, ["memory", "put", "blk/w", "--priority", "high", "--json"], env=env, input="x"
    )
    assert put.exit_code == 0, put.output
    assert json.loads(put.stdout)["priority"] == 500
    put = runner.invoke(
        app, ["memory", "put", "blk/n", "--priority", "42", "--json"], env=env, input="x"
    )
    assert json.loads(put.stdout)["priority"] == 42
    for given, word in (("600", "high"), ("1000", "user_facing"), ("Background", "background")):
        submitted = runner.invoke(app, ["submit", "--priority", given, "--", "true"], env=env)
        assert submitted.exit_code == 0, submitted.output
        with server.client("op") as client:
            status = client.get(
                "/api/tasks/status", params={"task_id": submitted.stdout.strip()}
            ).json()
        assert status["spec"]["priority"] == word
    granted = runner.invoke(
        app, ["alloc", "request", "llm", "1GiB", "--priority", "250", "--json"], env=env
    )
    assert granted.exit_code == 0, granted.output
    assert json.loads(granted.stdout)["priority"] == "normal"


@pytest.mark.parametrize(
    "command",
    [
        ["memory", "put", "blk/bad", "--priority", "2000"],
        ["memory", "put", "blk/bad", "--priority", "²"],
        ["submit", "--priority", "urgent", "--", "true"],
        ["alloc", "request", "llm", "1GiB", "--priority", "-1"],
    ],
)
def test_a_bad_priority_is_refused_naming_the_option(
    server: ServerProcess, command: list[str]
) -> None:
    result = runner.invoke(app, command, env=env_for(server), input="data")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        "error: --priority: expected a number from 0 to 1000 or one of background, normal, "
        "high, user_facing"
    ), result.stderr
    with server.client("op") as client:
        assert client.get("/v1/memory/blocks/blk/bad").status_code == 404  # nothing stored


def cli_at(server: ServerProcess, columns: int, *args: str) -> str:
    """``vramancer ARGS`` as a user runs it, in a terminal ``columns`` wide."""
    env = {**os.environ, **env_for(server), "COLUMNS": str(columns)}
    done = subprocess.run(
        [sys.executable, "-m", "vramancer.main", "--mode", "cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_tables_fit_80_columns_without_cutting_ids_names_or_states(
    server: ServerProcess,
) -> None:
    long_id = "nightly-finetune-of-the-long-model"
    with server.client("op") as client:
        body = {"type": "cmd", "cmd": ["sleep", "30", "--and-many-more-words"] * 4}
        body["task_id"] = long_id
        assert client.post("/api/tasks/submit", json=body).status_code == 200
        assert client.post(f"/api/tasks/{long_id}/cancel").status_code == 200
    for args, key in (
        (("tasks", "list"), rf"{long_id} +cmd +cancelled .* sl…"),
        (("models", "list"), r"toy-small-embedding-model-for-tables .* unloaded"),
    ):
        out = cli_at(server, 80, *args)
        assert max(len(line) for line in out.splitlines()) <= 80, out
        assert re.search(key, out), out
    # The command, the least useful column, is what gave way; on a wide terminal it is whole.
    wide = cli_at(server, 200, "tasks", "list")
    assert "sleep 30 --and-many-more-words sleep 30 --and-many-more-words" in wide


def test_an_id_longer_than_the_terminal_breaks_across_lines_whole(server: ServerProcess) -> None:
    block_id = "kv/sessions/very-long-conversation-identifier-0123456789/page/00042"
    with server.client("op") as client:
        assert client.put(f"/v1/memory/blocks/{block_id}", content=b"x").status_code == 200
    for columns in (80, 40):
        out = cli_at(server, columns, "memory", "blocks")
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= columns, out
        rows = lines[lines.index(next(ln for ln in lines if ln.startswith("─"))) + 1 : -1]
        firsts = "".join(row.split()[0] for row in rows if not row.startswith(" "))
        assert block_id in firsts and "…" not in firsts, out


@pytest.mark.parametrize(
    ("optimized", "host", "line"),
    [
        (True, 5 * 2**20, "freed host 5.0 MiB, GPU 0 B"),
        (False, 848 * 1024, "nothing to free (host 848.0 KiB, GPU 0 B: too little to count)"),
        (False, 0, "nothing to free"),
    ],
)
def test_optimize_says_one_thing(optimized: bool, host: int, line: str) -> None:
    result = {"optimized": optimized, "reclaimed_bytes": {"host": host, "gpu": 0}}
    assert optimize_summary(result) == line


def test_optimize_against_a_server_prints_one_verdict(server: ServerProcess) -> None:
    result = runner.invoke(app, ["optimize"], env=env_for(server))
    assert result.exit_code == 0, result.output
    first, *actions = result.stdout.splitlines()
    assert first.startswith(("freed host", "nothing to free")), result.stdout
    assert actions and all(a.startswith("  • ") for a in actions), result.stdout


def test_help_speaks_of_what_commands_do_not_of_project_notes() -> None:
    for path in commands(typer.main.get_command(app)):
        text = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).stdout
        found = re.findall(r"(?i)\b(?:seed|issue)s?\b|\bproperty #?\d+", text)
        assert found == [], (path, found)


def test_no_message_of_the_package_points_at_project_notes() -> None:
    """Every text the package can print (its string literals: errors, logs, help) is free of
    references to requirement notes or tracker entries."""
    src = Path(vramancer.__file__).parent
    found = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and re.search(r"(?i)\b(?:seed|issue)s? #?\d+", text):
                found.append((path.relative_to(src), node.lineno, text[:60]))
    assert found == []


def test_the_list_of_commands_gives_each_summary_as_one_paragraph() -> None:
    listing = runner.invoke(app, ["--help"], env={"COLUMNS": "300"}).stdout
    assert re.search(
        r"worker +Join a pool as a worker node: .* them\. Stops cleanly on SIGTERM or Ctrl-C "
        r"\(running tasks go back to the queue\)\.",
        listing,
    ), listing
