"""Task processes die with the daemon, by either mechanism (``setpriv --pdeathsig`` where
util-linux has it, a ``preexec_fn`` calling ``prctl`` otherwise), and a program is looked up as
``exec`` would look it up, so a missing one still fails at start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vramancer.tasks import runner

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

PARENT = """
import subprocess, sys, time
from vramancer.tasks import runner
if sys.argv[1] == "preexec":
    runner.setpriv = lambda: None
argv, preexec = runner.dying_with_parent(["sleep", "60"], {"PATH": "/usr/bin:/bin"}, "/")
assert (preexec is None) == (sys.argv[1] == "setpriv"), (argv, preexec)
child = subprocess.Popen(argv, preexec_fn=preexec, start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mechanism", ["setpriv", "preexec"])
def test_a_child_dies_when_its_parent_is_killed(mechanism: str) -> None:
    if mechanism == "setpriv" and runner.setpriv() is None:
        pytest.skip("no setpriv with --pdeathsig on this machine")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, mechanism], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 5
        while psutil.Process(child).name() != "sleep":  # setpriv execs it: the same pid
            assert time.monotonic() < deadline, psutil.Process(child).name()
            time.sleep(0.01)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while psutil.pid_exists(child) and psutil.Process(child).status() != "zombie":
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_programs_are_found_as_exec_finds_them(tmp_path: Path) -> None:
    tool = tmp_path / "bin" / "mytool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    assert runner.find_program("mytool", {"PATH": str(tool.parent)}, tmp_path) == str(tool)
    # a relative PATH entry is the task's working directory's, not the daemon's
    assert runner.find_program("mytool", {"PATH": "bin"}, tmp_path) == str(tool)
    assert runner.find_program("bin/mytool", {}, tmp_path) == "bin/mytool"
    with pytest.raises(FileNotFoundError):
        runner.find_program("mytool", {"PATH": "/usr/bin"}, tmp_path)
    with pytest.raises(FileNotFoundError):
        runner.find_program("/nonexistent/prog", {}, tmp_path)
    os.chmod(tool, 0o644)  # not executable: exec would refuse it too
    with pytest.raises(FileNotFoundError):
        runner.find_program("mytool", {"PATH": str(tool.parent)}, tmp_path)
