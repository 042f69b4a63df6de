"""Sharp edges people met, through the ``vramancer`` console script against a real
``vramancer serve``: a program that cannot start fails at once, errors under ``--json`` are
JSON, sizes in refusals are written for people, and a configured L4 capacity is the one in
force at every start."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    OPERATOR_SIM_GPU_CONFIG,
    ServerProcess,
    free_port,
    operator_env,
    running_server,
)
from tests.integration.test_serve_edges import Daemon

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).with_name("vramancer")
CONFIG = OPERATOR_SIM_GPU_CONFIG
#: A byte count as a machine writes it (six digits or more, with or without a unit).
RAW_BYTES = re.compile(r"\d{6,} ?(?:B\b|bytes)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp: Path = tmp_path_factory.mktemp("sharp-edges")
    with running_server(tmp, CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"}) as proc:
        yield proc


def vramancer(*args: str, url: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``vramancer ARGS`` as a user types it, with VRM_URL and the operator's token."""
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}"
    env = {**os.environ, **operator_env(url)}
    return subprocess.run(
        [str(SCRIPT), *args], env=env, input=input, capture_output=True, text=True, timeout=60
    )


def test_a_program_that_cannot_start_fails_at_once_and_is_not_retried(
    server: ServerProcess,
) -> None:
    done = vramancer("submit", "--retries", "3", "--wait", "--", "/no/such/binary", url=server.url)
    assert done.returncode != 0, done.stdout + done.stderr
    task_id = done.stdout.splitlines()[0].strip()
    assert "cannot start the program: No such file or directory; not retried" in (
        done.stdout + done.stderr
    )
    with server.client("op") as client:
        status = client.get("/api/tasks/status", params={"task_id": task_id}).json()
    assert status["state"] == "failed"
    assert status["attempts"] == 1  # three retries were allowed: none was used


def test_errors_under_json_are_json(server: ServerProcess) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    cases = [
        (("submit", "--vram", "2XB", "--json", "--", "true"), server.url, 2, "--vram: "),
        (("tasks", "cancel", "no-such-task", "--json"), server.url, 1, "HTTP 404"),
        (("tasks", "list", "--json"), closed, 1, "cannot reach VRAMancer"),
        (("can-load", "m", "--size", "lots", "--json"), server.url, 2, "--size: "),
        (("tasks", "cancel", "--json"), server.url, 2, "Missing argument 'task_id'"),
        (("tasks", "list", "--json", "true"), server.url, 2, "unexpected extra argument"),
        (("tasks", "lsit", "--json"), server.url, 2, "Did you mean 'list'?"),
    ]
    for args, url, code, words in cases:
        done = vramancer(*args, url=url)
        assert done.returncode == code, (args, done.stderr)
        assert done.stdout == "", args
        message = json.loads(done.stderr)["error"]["message"]
        assert words in message, (args, message)
    # Without --json, a usage error is for people.
    done = vramancer("tasks", "cancel", url=server.url)
    assert done.returncode == 2 and "Usage: vramancer tasks cancel" in done.stderr
    # status with no server reads this machine: its JSON on stdout, a note on stderr.
    done = vramancer("status", "--json", url=closed)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"] == "embedded"
    assert done.stderr.strip() == f"no VRAMancer server at {closed}; reading this machine directly"


def test_a_vram_refusal_speaks_in_sizes_people_read(server: ServerProcess) -> None:
    for args in (
        ("submit", "--vram", "100GiB", "--", "true"),
        ("alloc", "request", "llm", "30GiB"),
    ):
        done = vramancer(*args, url=server.url)
        assert done.returncode != 0, (args, done.stdout)
        assert re.search(r"\b(100|30)\.0 GiB\b", done.stderr), (args, done.stderr)
        assert not RAW_BYTES.search(done.stderr), (args, done.stderr)


def l4_capacity(url: str) -> int:
    done = vramancer("memory", "tiers", "--json", url=url)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    tiers = data["tiers"] if isinstance(data, dict) else data
    [l4] = [t for t in tiers if t["name"] == "L4"]
    return int(l4["capacity_bytes"])


def test_a_configured_l4_capacity_holds_at_every_start(tmp_path: Path) -> None:
    config = "[devices]\nbackends = []\n\n[memory]\nfsync = false\n\n"
    config += '[memory.tiers.L4]\ncapacity = "3GiB"\n'
    line = "memory tier L4: 3.0 GiB ([memory.tiers.L4] capacity)"
    for start in range(2):
        daemon = Daemon(tmp_path, config)
        try:
            assert l4_capacity(daemon.url) == 3 * 2**30, f"start {start + 1}"
            if start == 0:
                put = vramancer("memory", "put", "kv/a", url=daemon.url, input="x" * 4096)
                assert put.returncode == 0, put.stderr
            else:
                got = vramancer("memory", "get", "kv/a", url=daemon.url)
                assert got.returncode == 0 and got.stdout == "x" * 4096, got.stderr
        finally:
            log = daemon.stop()
        assert log.count(line) == 1, log


def test_a_configuration_that_does_not_add_up_speaks_in_sizes(tmp_path: Path) -> None:
    config = tmp_path / "vramancer.toml"
    config.write_text(
        '[devices]\nbackends = []\n[[devices.simulated]]\nname = "s"\nmemory = "24GiB"\n'
        'used = "30GiB"\n'
    )
    done = vramancer("status", "--embedded", "--config", str(config), url="http://127.0.0.1:9")
    assert done.returncode == 2
    assert "used (30.0 GiB) must not be more than memory (24.0 GiB)" in done.stderr
    assert not RAW_BYTES.search(done.stderr), done.stderr


def test_a_task_payload_too_large_is_refused_in_sizes(server: ServerProcess) -> None:
    with server.client("op") as client:
        body = {"type": "cmd", "cmd": ["true"], "payload": {"blob": "x" * (2 * 2**20)}}
        refused = client.post("/api/tasks/submit", json=body)
    assert refused.status_code in (400, 413, 422), refused.text
    message = refused.json()["error"]["message"]
    assert re.search(r"\d+\.\d [KMG]iB", message) and not RAW_BYTES.search(message), message


def test_a_key_written_in_another_case_gets_a_did_you_mean(tmp_path: Path) -> None:
    config = tmp_path / "vramancer.toml"
    config.write_text("[Server]\nport = 9000\n\n[memory]\nFsync = false\n")
    done = vramancer("status", "--embedded", "--config", str(config), url="http://127.0.0.1:9")
    assert done.returncode == 2
    first, *problems = done.stderr.splitlines()
    assert first == "error: invalid configuration:"
    assert sorted(problems) == [
        f"  Server: unknown key; did you mean server? (in {config})",
        f"  memory.Fsync: unknown key; did you mean memory.fsync? (in {config})",
    ]
