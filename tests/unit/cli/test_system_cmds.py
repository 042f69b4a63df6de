"""``vramancer status | top | recommend | can-load | optimize`` without a server (embedded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import free_port
from tests.unit.resources.ggufutil import write_llama_gguf
from vramancer.cli.main import app

CONFIG = """
[devices]
backends = []
[[devices.simulated]]
name = "sim0"
memory = "24GiB"
used = "6GiB"
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """No server (a closed port) and a config with one simulated GPU."""
    config = tmp_path / "vramancer.toml"
    config.write_text(CONFIG)
    return {"VRM_URL": f"http://127.0.0.1:{free_port()}", "VRM_CONFIG": str(config)}


runner = CliRunner()


def test_status_json_falls_back_to_this_machine(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["status", "--json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"] == "embedded"
    assert [(d["uuid"], d["simulated"]) for d in data["devices"]] == [("sim-sim0", True)]
    assert data["devices"][0]["memory_used_bytes"] == 6 * 1024**3
    assert data["host"]["memory_total_bytes"] > 0
    assert "no VRAMancer server at" in result.stderr


def test_status_for_people_shows_bars_and_host_memory(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["status", "--embedded"], env=env)
    assert result.exit_code == 0, result.output
    assert "Simulated GPU sim0" in result.stdout and "(simulated)" in result.stdout
    assert "6.0/24.0 GiB" in result.stdout
    assert "host RAM" in result.stdout
    assert "no VRAMancer server" not in result.stderr  # --embedded does not try the server


def test_top_once_and_count(env: dict[str, str]) -> None:
    once = runner.invoke(app, ["top", "--once", "--embedded"], env=env)
    assert once.exit_code == 0 and once.stdout.count("Simulated GPU sim0") == 1
    two = runner.invoke(
        app, ["top", "--count", "2", "--interval", "0.1", "--json", "--embedded"], env=env
    )
    assert two.exit_code == 0, two.output
    objects = [json.loads(line) for line in two.stdout.splitlines()]
    assert [o["devices"][0]["uuid"] for o in objects] == ["sim-sim0", "sim-sim0"]
    assert objects[0]["taken_at"] < objects[1]["taken_at"]


def test_recommend_with_params_and_with_a_gguf_file(env: dict[str, str], tmp_path: Path) -> None:
    result = runner.invoke(app, ["recommend", "mistral", "--params", "7B", "--json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] in ("int8", "int4") and data["platform"] == "gpu"  # the simulated GPU
    path = write_llama_gguf(tmp_path / "tiny.gguf")
    result = runner.invoke(app, ["recommend", "tiny", "--file", str(path), "--json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["estimate"]["source"] == "gguf" and data["estimate"]["total_bytes"] > 0
    people = runner.invoke(app, ["recommend", "tiny", "--file", str(path)], env=env)
    assert "parameters, weights" in people.stdout


def test_recommend_errors_name_the_field(env: dict[str, str], tmp_path: Path) -> None:
    bad = runner.invoke(app, ["recommend", "m", "--params", "lots"], env=env)
    assert bad.exit_code == 1 and "params:" in bad.stderr
    missing = runner.invoke(app, ["recommend", "m", "--file", str(tmp_path / "x.gguf")], env=env)
    assert (
        missing.exit_code == 1 and "--file:" in missing.stderr and "no such file" in missing.stderr
    )


def test_can_load_exit_codes(env: dict[str, str]) -> None:
    fits = runner.invoke(app, ["can-load", "m", "--size-mb", "1000", "--json"], env=env)
    assert fits.exit_code == 0, fits.output
    assert json.loads(fits.stdout)["device"] == "gpu:0"
    huge = runner.invoke(app, ["can-load", "m", "--size-mb", "900000000"], env=env)
    assert huge.exit_code == 3 and "no" in huge.stdout
    negative = runner.invoke(app, ["can-load", "m", "--size-mb", "-1"], env=env)
    assert negative.exit_code == 2 and "--size-mb" in negative.stderr


def test_optimize_needs_a_server(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["optimize"], env=env)
    assert result.exit_code == 1
    assert "cannot reach VRAMancer" in result.stderr


def test_bad_config_is_named(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[devices]\npoll_interval_s = -1\n")
    result = runner.invoke(app, ["status", "--embedded", "--config", str(config)])
    assert result.exit_code == 2
    assert "devices.poll_interval_s" in result.stderr


def test_python_m_vramancer_main_mode_cli_shows_status(env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vramancer.main", "--mode", "cli"],
        env={**env, "PATH": "/usr/bin:/bin", "COLUMNS": "100"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Simulated GPU sim0" in proc.stdout and "host RAM" in proc.stdout


def test_python_m_vramancer_main_help_reaches_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vramancer.main", "--mode", "cli", "--help"],
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "100"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--mode cli (the default)" in proc.stdout
    assert "can-load" in proc.stdout and "recommend" in proc.stdout  # the vramancer commands


def test_status_view_prints_names_and_errors_as_they_are() -> None:
    """Device names and driver errors are text, not rich markup (``[/x]`` used to crash)."""
    from rich.console import Console

    from vramancer.cli.system_cmds import status_view

    gpu = {
        "index": 0,
        "name": "GPU [beta]",
        "backend": "nvidia",
        "simulated": False,
        "error": "read failed [/oops]",
        "memory_used_bytes": 1,
        "memory_total_bytes": 2,
    }
    host = {"memory_total_bytes": 4, "memory_available_bytes": 2, "cpu_count": 1}  # fmt: skip
    console = Console(record=True, width=200)
    console.print(status_view({"node": "n", "devices": [gpu], "host": host}))
    text = console.export_text()
    assert "GPU [beta]" in text and "error: read failed [/oops]" in text


def test_errors_are_printed_as_plain_text(tmp_path: Path) -> None:
    config = tmp_path / "open.toml"
    config.write_text("")
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--config", str(config)])
    assert result.exit_code == 2
    assert "Add tokens under [auth] tokens in the config file" in result.stderr


def test_serve_refuses_an_unknown_log_level_or_port(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--log-level", "loud"])
    assert result.exit_code == 2 and "--log-level: must be one of" in result.stderr
    result = runner.invoke(app, ["serve", "--port", "99999"])
    assert result.exit_code == 2 and "--port" in result.stderr


def test_json_log_lines() -> None:
    import logging

    from vramancer.cli.serve import JsonLogFormatter

    record = logging.LogRecord("vramancer.x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    line = json.loads(JsonLogFormatter().format(record))
    assert (line["level"], line["logger"], line["message"]) == ("warning", "vramancer.x", "a b")


def test_serve_names_a_metrics_port_it_cannot_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"VRM_METRICS_PORT": str(port), "VRM_DATA_DIR": str(tmp_path / "d")}
        config = tmp_path / "c.toml"
        config.write_text("[devices]\nbackends = []\n")
        result = runner.invoke(app, ["serve", "--config", str(config)], env=env)
    assert result.exit_code == 2
    assert f"VRM_METRICS_PORT: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_the_lite_install_runs_without_torch_or_the_gpu_extras(env: dict[str, str]) -> None:
    """The lite build: ``python -m vramancer.main --mode cli`` with torch, nvidia-ml-py,
    nats-py, gguf and safetensors absent (imports of them fail, as when not installed)."""
    script = (
        "import sys\n"
        "for m in ('torch', 'pynvml', 'nats', 'gguf', 'safetensors'):\n"
        "    sys.modules[m] = None\n"
        "from vramancer.main import run\n"
        "run(['--mode', 'cli', 'status', '--json', '--embedded'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["devices"][0]["uuid"] == "sim-sim0"


def test_status_without_a_server_counts_every_used_byte_as_external(env: dict[str, str]) -> None:
    """No daemon: nothing is reserved, so the 6 GiB the GPU reports used are external."""
    data = json.loads(runner.invoke(app, ["status", "--json", "--embedded"], env=env).stdout)
    gpu = data["devices"][0]
    assert (gpu["memory_reserved_bytes"], gpu["memory_external_bytes"]) == (0, 6 * 1024**3)
    assert [(h["kind"], h["id"], h["bytes"]) for h in gpu["holders"]] == [
        ("external", "unattributed", 6 * 1024**3)
    ]
    human = runner.invoke(app, ["status", "--embedded"], env={**env, "COLUMNS": "200"})
    assert "used 6.0 GiB (driver) · reserved 0 B · external 6.0 GiB · total 24.0 GiB" in (
        human.stdout
    )
    assert "in use outside VRAMancer, not reported per process" in human.stdout
