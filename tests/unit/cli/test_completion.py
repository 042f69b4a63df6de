"""``vramancer completion SHELL`` prints a script the shell accepts, and the script's call back
into ``vramancer`` completes the real command names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: The ``vramancer`` entry point of the environment running the tests.
VRAMANCER = Path(sys.executable).with_name("vramancer")

pytestmark = pytest.mark.skipif(
    not VRAMANCER.exists(), reason=f"the vramancer script is not installed next to {sys.executable}"
)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VRAMANCER), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_bash_script_is_valid_bash_and_completes_vramancer(tmp_path: Path) -> None:
    proc = run("completion", "bash")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert "complete -o default -F _vramancer_completion vramancer" in script
    assert "_VRAMANCER_COMPLETE=complete_bash" in script
    path = tmp_path / "vramancer.bash"
    path.write_text(script)
    bash = shutil.which("bash")
    assert bash is not None
    check = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stderr


def test_the_scripts_callback_completes_command_names() -> None:
    """What the bash function asks for: ``vramancer se<TAB>`` offers ``serve``."""
    proc = run(
        env={
            "_VRAMANCER_COMPLETE": "complete_bash",
            "COMP_WORDS": "vramancer se",
            "COMP_CWORD": "1",
        }
    )
    assert proc.returncode == 0, proc.stderr
    assert "serve" in proc.stdout.split()
    assert "status" not in proc.stdout.split()


@pytest.mark.parametrize(("shell", "marker"), [("zsh", "#compdef vramancer"), ("fish", "complete")])
def test_zsh_and_fish_scripts_name_vramancer(shell: str, marker: str) -> None:
    proc = run("completion", shell)
    assert proc.returncode == 0, proc.stderr
    assert marker in proc.stdout and "_VRAMANCER_COMPLETE" in proc.stdout


def test_an_unknown_shell_is_refused_with_the_choices() -> None:
    proc = run("completion", "tcsh")
    assert proc.returncode == 2
    assert "bash" in proc.stderr and "tcsh" in proc.stderr
