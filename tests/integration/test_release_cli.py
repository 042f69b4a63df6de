"""``vramancer release ...`` as a user runs it: real processes on a real git repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gitrepo import BUILD, TEST, GitRepo
from tests.helpers import toml_value


@pytest.fixture
def setup(tmp_path: Path) -> tuple[GitRepo, dict[str, str], Path]:
    repo = GitRepo(tmp_path / "repo")
    deploy = tmp_path / "deploy"
    config = tmp_path / "vramancer.toml"
    config.write_text(
        "[release]\n"
        f"repo = {toml_value(str(repo.path))}\n"
        f"dir = {toml_value(str(deploy))}\n"
        f"build = {toml_value(BUILD)}\n"
        f"test = {toml_value(TEST)}\n"
        "keep = 3\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    env.update({"VRM_CONFIG": str(config), "VRM_DATA_DIR": str(tmp_path / "data")})
    return repo, env, deploy


def vrm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vramancer.main", "--mode", "cli", "release", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def version(deploy: Path) -> str:
    return (deploy / "current" / "checkout" / "version.txt").read_text().strip()


def test_prepare_accept_and_rollback_from_the_command_line(
    setup: tuple[GitRepo, dict[str, str], Path],
) -> None:
    repo, env, deploy = setup
    repo.commit(passing=True, version="v1")
    done = vrm(env, "prepare", "--json")
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout)["release"]

    refused = vrm(env, "accept")  # no terminal, no --yes
    assert refused.returncode == 2
    assert "give --yes" in refused.stderr
    assert not (deploy / "current").exists()

    assert vrm(env, "accept", "--yes").returncode == 0
    assert version(deploy) == "v1"

    repo.commit(passing=False, version="v2")
    failed = vrm(env, "prepare")
    assert failed.returncode == 1
    assert "failed" in failed.stdout and "exit code 3" in failed.stdout
    logs = vrm(env, "logs", "test")
    assert logs.returncode == 0 and "a test fails" in logs.stdout
    no_candidate = vrm(env, "accept", "--yes")
    assert no_candidate.returncode == 1 and "no candidate" in no_candidate.stderr

    status = json.loads(vrm(env, "status", "--json").stdout)
    assert status["current"] == first and status["candidate"] is None
    assert [r["state"] for r in status["releases"]] == ["failed", "passed"]
    shown = vrm(env, "status")
    assert first in shown.stdout and "exit 3" in shown.stdout
    # On a narrow terminal the name rollback takes still shows whole, on one line.
    narrow = vrm({**env, "COLUMNS": "60"}, "status")
    assert narrow.returncode == 0, narrow.stderr
    assert any(line.startswith(f"{first} ") for line in narrow.stdout.splitlines())

    repo.commit(passing=True, version="v3")
    assert vrm(env, "watch", "--once").returncode == 0
    assert vrm(env, "accept", "--yes").returncode == 0
    assert version(deploy) == "v3"
    nothing_new = vrm(env, "watch", "--once")
    assert "no new commit" in nothing_new.stderr

    assert vrm(env, "rollback").returncode == 2  # asks first
    back = vrm(env, "rollback", "--yes", "--json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["release"] == first
    assert version(deploy) == "v1"

    bad = vrm(env, "rollback", "../etc", "--yes")
    assert bad.returncode == 1 and "release must be a release's name" in bad.stderr
    assert vrm(env, "watch", "--interval", "0s", "--once").returncode == 2


def test_without_a_repository_the_agent_says_so(
    setup: tuple[GitRepo, dict[str, str], Path], tmp_path: Path
) -> None:
    _, env, _ = setup
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    env = {**env, "VRM_CONFIG": str(empty)}
    done = vrm(env, "prepare")
    assert done.returncode == 1 and "[release] repo is not set" in done.stderr
    status = json.loads(vrm(env, "status", "--json").stdout)
    assert status["configured"] is False and status["releases"] == []
    shown = vrm(env, "status")
    assert "no [release] repo configured" in shown.stdout  # the section named as written


def on_a_terminal(env: dict[str, str], answer: str, *args: str) -> tuple[int, str]:
    """Run ``vramancer release ARGS`` with a terminal on stdin, answering ``answer``."""
    import pty

    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vramancer.main", "--mode", "cli", "release", *args],
            env=env,
            stdin=secondary,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(primary, answer.encode())
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err
    finally:
        os.close(primary)
        os.close(secondary)


def test_accept_asks_on_a_terminal(setup: tuple[GitRepo, dict[str, str], Path]) -> None:
    repo, env, deploy = setup
    repo.commit(passing=True, version="v1")
    assert vrm(env, "prepare").returncode == 0
    code, err = on_a_terminal(env, "n\n", "accept")
    assert code == 1 and "accept will:" in err and "point current at" in err
    assert "accept not done" in err and not (deploy / "current").exists()
    code, err = on_a_terminal(env, "y\n", "accept")
    assert code == 0, err
    assert version(deploy) == "v1"
