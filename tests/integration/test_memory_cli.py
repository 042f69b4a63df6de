"""``vramancer memory get|delete`` through the installed console script against a real server:
where ``get`` may write a block's bytes (a pipe, a 0600 file, never a terminal), and ``delete``."""

from __future__ import annotations

import json
import os
import pty
import select
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import vramancer
from tests.helpers import ServerProcess, running_server

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = { "op" = "operator", "view" = "viewer" }
[memory]
fsync = false
"""

#: The ``vramancer`` console script installed next to this interpreter.
SCRIPT = Path(sys.executable).parent / "vramancer"
#: Binary bytes, escape sequences included: what must never reach a terminal.
PAYLOAD = bytes(range(256)) * 40


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("memory-cli"), CONFIG) as proc:
        yield proc


def cli_env(server: ServerProcess, token: str = "op") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    # The sources under test, not whatever copy the console script was installed from.
    env["PYTHONPATH"] = str(Path(vramancer.__file__).parents[1])
    env.update({"VRM_URL": server.url, "VRM_API_TOKEN": token, "COLUMNS": "200"})
    return env


def cli(server: ServerProcess, *args: str, token: str = "op") -> subprocess.CompletedProcess[bytes]:
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}"
    return subprocess.run(
        [str(SCRIPT), *args], env=cli_env(server, token), capture_output=True, timeout=60
    )


def store(server: ServerProcess, block_id: str, data: bytes = PAYLOAD) -> None:
    with server.client("op") as op:
        r = op.put(f"/v1/memory/blocks/{block_id}", content=data)
        assert r.status_code == 200, r.text


def one_line(err: bytes) -> str:
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_get_to_a_pipe_writes_the_bytes(server: ServerProcess) -> None:
    store(server, "pipe/block")
    done = cli(server, "memory", "get", "pipe/block")
    assert done.returncode == 0, done.stderr
    assert done.stdout == PAYLOAD
    explicit = cli(server, "memory", "get", "pipe/block", "-o", "-")
    assert explicit.returncode == 0, explicit.stderr
    assert explicit.stdout == PAYLOAD


def test_get_to_a_file_is_0600_and_never_overwrites_without_force(
    server: ServerProcess, tmp_path: Path
) -> None:
    store(server, "file/block")
    out = tmp_path / "block.bin"
    done = cli(server, "memory", "get", "file/block", "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == PAYLOAD
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert json.loads(done.stdout)["size"] == len(PAYLOAD)

    out.write_bytes(b"keep me")
    out.chmod(0o644)
    again = cli(server, "memory", "get", "file/block", "-o", str(out))
    assert again.returncode == 2
    assert "--force" in one_line(again.stderr) and str(out) in again.stderr.decode()
    assert out.read_bytes() == b"keep me"

    forced = cli(server, "memory", "get", "file/block", "-o", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert out.read_bytes() == PAYLOAD
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_get_of_an_unknown_block_leaves_no_file(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "missing.bin"
    done = cli(server, "memory", "get", "no/such/block", "-o", str(out))
    assert done.returncode == 1 and b"404" in done.stderr
    assert not out.exists()


def run_on_a_terminal(server: ServerProcess, *args: str) -> tuple[int, bytes, bytes]:
    """Run the CLI with a pseudo-terminal as stdout: (exit code, what reached it, stderr)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [str(SCRIPT), *args],
            env=cli_env(server),
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        os.close(slave)
        shown = b""
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # Linux: EIO once the other side is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    return proc.returncode, shown, proc.stderr


def test_get_refuses_to_write_bytes_to_a_terminal(server: ServerProcess, tmp_path: Path) -> None:
    store(server, "tty/block")
    for args in (["memory", "get", "tty/block"], ["memory", "get", "tty/block", "-o", "-"]):
        code, shown, err = run_on_a_terminal(server, *args)
        assert code == 2, err
        assert shown == b""
        line = one_line(err)
        assert "-o FILE" in line and "pipe" in line and "terminal" in line

    # A file named with -o is fine while stdout is a terminal.
    out = tmp_path / "from-tty.bin"
    code, shown, err = run_on_a_terminal(server, "memory", "get", "tty/block", "-o", str(out))
    assert code == 0, err
    assert out.read_bytes() == PAYLOAD
    assert PAYLOAD[:64] not in shown


def test_delete_removes_the_block(server: ServerProcess) -> None:
    store(server, "gone/a")
    store(server, "gone/b")
    done = cli(server, "memory", "delete", "gone/a", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"id": "gone/a", "deleted": True}
    human = cli(server, "memory", "delete", "gone/b")
    assert human.returncode == 0, human.stderr
    assert human.stdout.decode().strip() == "deleted gone/b"
    with server.client("view") as view:
        assert view.get("/v1/memory/blocks/gone/a").status_code == 404
        assert view.get("/v1/memory/blocks/gone/b").status_code == 404


def test_delete_of_an_unknown_block_names_it(server: ServerProcess) -> None:
    done = cli(server, "memory", "delete", "never/stored", "--json")
    assert done.returncode == 1
    assert done.stdout == b""
    line = one_line(done.stderr)
    assert "never/stored" in line and "404" in line


def test_delete_needs_the_operator_role(server: ServerProcess) -> None:
    store(server, "kept/block")
    done = cli(server, "memory", "delete", "kept/block", token="view")
    assert done.returncode == 1
    assert "kept/block" in one_line(done.stderr)
    with server.client("view") as view:
        assert view.get("/v1/memory/blocks/kept/block").status_code == 200
