"""A new user's first commands on a machine without a GPU, through the ``vramancer`` console
script against a real ``vramancer serve``: what they print must be readable (sizes, not byte
counts; configuration names such as ``[tasks]`` printed as they are) and a request the machine
cannot serve must say what to do instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import vramancer
from tests.helpers import ServerProcess, free_port, running_server, wait_http

pytestmark = pytest.mark.integration

#: No vendor probed and no simulated device: a CPU-only machine, wherever the tests run.
CONFIG = """
[devices]
backends = []
[memory]
fsync = false
"""

#: The ``vramancer`` console script installed next to this interpreter.
SCRIPT = Path(sys.executable).parent / "vramancer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("first-steps"), CONFIG) as proc:
        yield proc


def cli_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    # The sources under test, not whatever copy the console script was installed from.
    env["PYTHONPATH"] = str(Path(vramancer.__file__).parents[1])
    env.update({"VRM_URL": url, "COLUMNS": "200"})
    return env


def cli(
    server: ServerProcess, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}"
    return subprocess.run(
        [str(SCRIPT), *args],
        env=cli_env(server.url),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_profile_notes_keep_the_configuration_names_they_cite(server: ServerProcess) -> None:
    switched = cli(server, "profile", "set", "recording")
    assert switched.returncode == 0, switched.stderr
    assert "[gpu_manager] vlm_model" in switched.stdout  # was printed "named by  vlm_model"
    shown = cli(server, "profile", "show")
    assert shown.returncode == 0, shown.stderr
    assert "profile in force: recording" in shown.stdout
    # The switch it repeats is the last one, not one that `show` just made.
    assert "last switch:\nswitched to recording" in shown.stdout


def test_vram_on_a_machine_without_gpu_says_to_run_on_the_cpu(server: ServerProcess) -> None:
    refused = cli(server, "submit", "--vram", "4GiB", "--", "python", "-c", "print(1)")
    assert refused.returncode == 1
    assert "this machine has no GPU" in refused.stderr
    assert "no --vram" in refused.stderr and "largest: 0 B" not in refused.stderr
    assert cli(server, "tasks", "list", "--json").stdout.count('"task_id"') == 0  # nothing queued
    ran = cli(server, "submit", "--wait", "--", "python", "-c", "print(1)")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().endswith("1")


def test_memory_get_to_a_file_says_the_size_not_a_byte_count(
    server: ServerProcess, tmp_path: Path
) -> None:
    page = tmp_path / "page.bin"
    page.write_bytes(b"\x01" * 4096)
    put = cli(server, "memory", "put", "kv/page/1", str(page))
    assert put.returncode == 0, put.stderr
    got = cli(server, "memory", "get", "kv/page/1", "-o", str(tmp_path / "copy.bin"))
    assert got.returncode == 0, got.stderr
    assert got.stderr.strip() == f"wrote 4.0 KiB of kv/page/1 to {tmp_path / 'copy.bin'}"
    assert (tmp_path / "copy.bin").read_bytes() == page.read_bytes()
    tiers = cli(server, "memory", "tiers")
    assert tiers.returncode == 0, tiers.stderr
    assert "rel. latency" in tiers.stdout  # 5, 16, 50: relative costs, not milliseconds


def test_serve_logs_the_tier_sizes_readably(tmp_path: Path) -> None:
    (tmp_path / "serve.toml").write_text(
        CONFIG + '[memory.tiers.L4]\ncapacity = "64MiB"\n[memory.tiers.L5]\ncapacity = "1GiB"\n'
    )
    env = cli_env("http://127.0.0.1:1")
    env.update({"VRM_DATA_DIR": str(tmp_path / "data"), "HOME": str(tmp_path)})
    port = free_port()
    proc = subprocess.Popen(
        [str(SCRIPT), "serve", "--port", str(port), "--config", str(tmp_path / "serve.toml")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        text = proc.communicate(timeout=30)[0].decode()
    assert "memory tier L4: 64.0 MiB" in text and "memory tier L5: 1.0 GiB" in text, text


def test_help_paragraphs_are_not_cut_mid_sentence(tmp_path: Path) -> None:
    env = cli_env("http://127.0.0.1:1")
    env["COLUMNS"] = "200"
    worker = subprocess.run(
        [str(SCRIPT), "worker", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert worker.returncode == 0, worker.stderr
    # The docstring breaks its line after "run the tasks the"; the help flows on.
    assert "run the tasks the pool's orchestrator gives them" in worker.stdout
    listed = subprocess.run(
        [str(SCRIPT), "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "run the tasks the pool's orchestrator gives them" in listed.stdout
    recover = subprocess.run(
        [str(SCRIPT), "memory", "recover", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Paragraphs stay apart; only the lines inside one are joined.
    first = next(line for line in recover.stdout.splitlines() if "VRAMancer stopped." in line)
    assert "The old catalog" not in first
    assert "what it still says is kept" in recover.stdout


def test_evict_bytes_without_a_tier_names_both_options(server: ServerProcess) -> None:
    done = cli(server, "memory", "evict", "--bytes", "1GiB")
    assert done.returncode == 2
    assert done.stderr.startswith("error: --bytes needs --tier")
    assert "HTTP" not in done.stderr  # said before asking the server


def test_alloc_request_help_has_no_source_markup() -> None:
    env = cli_env("http://127.0.0.1:1")
    done = subprocess.run(
        [str(SCRIPT), "alloc", "request", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "its id is what alloc release takes" in done.stdout and "``" not in done.stdout
