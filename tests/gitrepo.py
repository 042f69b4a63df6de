"""Real git repositories for the release agent's tests: a branch whose head passes its tests
(``check.sh`` exits 0) or fails them (exits 3)."""

from __future__ import annotations

import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
}
#: The release settings the tests use: the build writes built.txt, the test runs check.sh.
BUILD = "echo building $RELEASE_NAME && echo built > built.txt"
TEST = "sh check.sh"


class GitRepo:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "--quiet", "--initial-branch=main")

    def git(self, *args: str) -> str:
        import os

        env = {**os.environ, **GIT_ENV}
        out = subprocess.run(
            ["git", *args], cwd=self.path, env=env, check=True, capture_output=True, text=True
        )
        return out.stdout.strip()

    def commit(self, *, passing: bool, version: str) -> str:
        """A commit whose check.sh passes or fails; ``version.txt`` says ``version``."""
        (self.path / "version.txt").write_text(version + "\n")
        body = "echo tests pass\nexit 0\n" if passing else "echo a test fails\nexit 3\n"
        (self.path / "check.sh").write_text(body)
        self.git("add", "-A")
        self.git("commit", "--quiet", "-m", version)
        return self.git("rev-parse", "HEAD")
