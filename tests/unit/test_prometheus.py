"""deploy/prometheus: the scrape config and the alert rules pass ``promtool``, and the rules'
unit tests (series that fire each alert, and series just short of it) pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DIR = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
#: The token file the shipped config names (it exists only on a configured host).
TOKEN_FILE = "/etc/prometheus/vramancer-token"
ALERTS = {
    "VRAMancerDown",
    "VRAMancerJournalGrowing",
    "VRAMancerEvictionStorm",
    "VRAMancerGPUHot",
    "VRAMancerQueueStuck",
    "VRAMancerPoolNodeDown",
}

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


def promtool(*args: str, cwd: Path = DIR) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_config_is_valid_with_its_token_file_and_rules(tmp_path: Path) -> None:
    """A full check reads the token file and the rule files: both are given in a copy."""
    token = tmp_path / "token"
    token.write_text("view\n")
    text = (DIR / "prometheus.yml").read_text()
    assert TOKEN_FILE in text
    (tmp_path / "prometheus.yml").write_text(text.replace(TOKEN_FILE, str(token)))
    shutil.copy(DIR / "vramancer-rules.yml", tmp_path)
    proc = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout + proc.stderr


def test_config_scrapes_the_daemons_metrics_with_a_bearer_token() -> None:
    config = yaml.safe_load((DIR / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8470"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": TOKEN_FILE}


def test_rules_are_valid_and_name_each_alert() -> None:
    proc = promtool("check", "rules", "vramancer-rules.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = yaml.safe_load((DIR / "vramancer-rules.yml").read_text())
    names = {r["alert"] for group in rules["groups"] for r in group["rules"]}
    assert names == ALERTS


def test_each_alert_fires_on_its_series() -> None:
    proc = promtool("test", "rules", "vramancer-rules.test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = yaml.safe_load((DIR / "vramancer-rules.test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired == ALERTS


def test_a_broken_expectation_fails(tmp_path: Path) -> None:
    """The unit tests can fail: the GPU alert must not fire at 84 °C."""
    for name in ("vramancer-rules.yml", "vramancer-rules.test.yml"):
        shutil.copy(DIR / name, tmp_path)
    rules = tmp_path / "vramancer-rules.yml"
    rules.write_text(
        rules.read_text().replace(
            "vramancer_gpu_temperature_celsius > 85", "vramancer_gpu_temperature_celsius > 80"
        )
    )
    proc = promtool("test", "rules", "vramancer-rules.test.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "VRAMancerGPUHot" in proc.stdout + proc.stderr
