"""The systemd units in deploy/systemd pass ``systemd-analyze verify``: every key known and
well-formed, the command executable. The binary is pointed at this environment's ``vramancer``
for the check (a copy in a temporary directory), the rest of each unit is checked as shipped."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
#: Where the units expect the command (a ``pip install`` into /usr/local, or a link there).
INSTALLED = "/usr/local/bin/vramancer"
#: What each unit runs.
EXEC = {
    "vramancer.service": f"ExecStart={INSTALLED} serve",
    "vramancer-worker.service": f"ExecStart={INSTALLED} worker --config /etc/vramancer/worker.toml",
    "vramancer-release.service": f"ExecStart={INSTALLED} release watch --once",
}
#: Units without a command of their own (copied as they are).
PLAIN = ("vramancer-release.timer",)
VRAMANCER = Path(sys.executable).with_name("vramancer")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def complaints(proc: subprocess.CompletedProcess[str], names: list[str]) -> list[str]:
    """Lines of the verifier's output about the given unit files."""
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if any(name in line for name in names)]


def copies(tmp_path: Path) -> list[Path]:
    out = []
    for name, exec_line in EXEC.items():
        text = (UNITS / name).read_text()
        assert exec_line in text.splitlines(), (name, exec_line)
        path = tmp_path / name
        path.write_text(text.replace(INSTALLED, str(VRAMANCER)))
        out.append(path)
    for name in PLAIN:
        path = tmp_path / name
        path.write_text((UNITS / name).read_text())
        out.append(path)
    return out


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.skipif(not VRAMANCER.exists(), reason=f"no vramancer script next to {sys.executable}")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    paths = copies(tmp_path)
    proc = verify(paths)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert complaints(proc, [*EXEC, *PLAIN]) == [], proc.stdout + proc.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_the_check_sees_a_bad_key(tmp_path: Path) -> None:
    """The verifier reports a misspelled key (a warning, exit status 0) and a bad value."""
    path = tmp_path / "vramancer.service"
    text = (UNITS / "vramancer.service").read_text().replace(INSTALLED, str(VRAMANCER))
    path.write_text(text.replace("KillMode=mixed", "KillMode=mixd\nRestartSecs=2"))
    found = complaints(verify([path]), ["vramancer.service"])
    assert any("RestartSecs" in line for line in found), found
    assert any("mixd" in line for line in found), found
