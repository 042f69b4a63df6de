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
    assert json.loads(fits.stdout)["device"] == "sim:0"
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
