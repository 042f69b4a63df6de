"""Every example of README.md's "Use" section, run as written on a fresh set-up.

The ```bash lines and the ```python blocks are read from README.md itself; each runs through
bash (or ``python``) in a fresh directory with a fresh ``VRM_DATA_DIR`` and ``HOME``, against the
daemon started by the set-up line's own ``vramancer serve`` (on a free port: ``VRM_URL`` points
at it). ``vramancer`` and ``python`` on ``PATH`` are this environment's, running this checkout's
package, as an activated ``.venv`` would. The set-up commands themselves (``pip install``) are
not run here: CI installs before it tests.

What differs from a user's machine, and why:

* On a machine without an NVIDIA GPU the daemon is given one simulated 24 GiB GPU (the only
  configuration it gets), because ``submit --vram 4GiB`` needs a GPU with 4 GiB to grant;
  where a GPU answers, the daemon runs with the default configuration on it.
* ``vramancer top`` is live: it runs until it has drawn the devices, then gets Ctrl-C
  (SIGINT), which ends it with exit code 0.
* The pool lines run in a second test against a real ``nats-server``: the worker's
  ``nats://hub:4222`` is replaced by that server's address, the orchestrator is a
  ``vramancer serve`` joined to the same server, and ``vramancer nodes`` must list the worker.

``EXPECTED`` holds every README line, in order, with what its output must show: a line added,
changed or removed in README.md fails ``test_the_readme_examples_are_the_ones_tested`` until
it is run here too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import vramancer
from tests.helpers import free_port, has_nvidia_gpu, wait_for, wait_http
from tests.natsserver import NatsServer

# A daemon, a dozen CLI processes and a task: more than the default 120 s on a busy machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: The directory holding the ``vramancer`` package under test.
SRC = Path(vramancer.__file__).resolve().parents[1]

#: Every command line of the "Use" section (its comment left out), in order, and a pattern its
#: output must contain.
EXPECTED: dict[str, str] = {
    "vramancer status": r"host RAM",
    "vramancer top": r"host RAM",
    "vramancer can-load mistral-7b --size 14GiB": r"^yes",
    "vramancer recommend llama3 --params 8B": r"for llama3",
    "vramancer models list": r"no managed models: add \[\[models\]\]",
    "vramancer profile set recording": r"switched to recording(.|\n)*places no model",
    "vramancer submit --vram 4GiB --wait -- python train.py": r"train\.py ran on gpu:\d",
    "vramancer tasks list": r"\bdone\b.*python train\.py",
    "vramancer memory put kv/page/1 page.bin && vramancer memory tiers": (
        r"stored kv/page/1 \(4\.0 KiB\) in L\d(.|\n)*1 block "
    ),
    "vramancer worker --nats nats://hub:4222 --name box-3090": (
        r"worker box-3090 is in the pool with \d+ GPU(.|\n)*worker box-3090 left the pool"
    ),
    "vramancer nodes": r"\bup\b",
    "vramancer --help": r"Usage: vramancer(.|\n)*submit",
}
#: Lines run until their output shows, then stopped with Ctrl-C.
LIVE = {"vramancer top"}
#: Lines of a pool, run by ``test_the_pool_lines_run_against_a_real_nats_server``.
POOL = {"vramancer worker --nats nats://hub:4222 --name box-3090"}
#: The README's placeholder for the pool's NATS server.
HUB = "nats://hub:4222"
#: The ```python blocks of the "Use" section, in order: whether the daemon runs, and a
#: pattern of the output.
PYTHON_EXPECTED = [(True, r"^\[\{'index': 0, .*\]\ndone 0$"), (False, r"'gpus': \[\{'index': 0")]
#: What the task of ``submit -- python train.py`` runs (the working directory's train.py).
TRAIN_PY = 'import os\nprint("train.py ran on", os.environ["VRM_DEVICE"])\n'
SIMULATED_GPU = '[[devices.simulated]]\nname = "sim0"\nmemory = "24GiB"\n'


def section(text: str, title: str) -> str:
    """The text of the ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def command_lines(block: str) -> list[str]:
    """The block's commands without their trailing ``# comment``."""
    lines = (re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line]


def readme() -> str:
    return README.read_text(encoding="utf-8")


def use_commands() -> list[str]:
    return [line for b in blocks(section(readme(), "Use"), "bash") for line in command_lines(b)]


def serve_command() -> str:
    """The daemon's command: the last step of the set-up line (``... && vramancer serve``)."""
    setup = [line for b in blocks(section(readme(), "Set up"), "bash") for line in b.splitlines()]
    assert len(setup) == 2, f"the set-up is two commands, found {setup}"
    last = setup[0].split("&&")[-1].strip()
    assert last == "vramancer serve", setup[0]
    return last


@dataclass
class Shell:
    """A fresh user's shell: a working directory, ``PATH`` with ``vramancer`` and ``python``,
    ``HOME``, ``VRM_DATA_DIR``, ``VRM_URL`` (and ``VRM_CONFIG`` with a simulated GPU where none
    answers)."""

    cwd: Path
    env: dict[str, str]

    def run(self, line: str, timeout: float = 120.0) -> str:
        done = subprocess.run(
            ["bash", "-c", line],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"`{line}` exited with {done.returncode}:\n{out}"
        return out

    def start(self, line: str, **env: str) -> Running:
        """Start ``line`` in the background, its output going to a file."""
        log = self.cwd.parent / f"output-{len(list(self.cwd.parent.glob('output-*')))}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {line}"],
                cwd=self.cwd,
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return Running(proc, log)


@dataclass
class Running:
    """A command running in the background (its own process group)."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Send ``sig`` to its group, wait for it to end; its whole output."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        return self.output()


def make_shell(tmp: Path, port: int) -> Shell:
    bin_dir, home, work = tmp / "bin", tmp / "home", tmp / "work"
    for d in (bin_dir, home, work):
        d.mkdir()
    # What `pip install .` puts on PATH, running this checkout's package.
    vrm = bin_dir / "vramancer"
    vrm.write_text(
        f"#!{sys.executable}\nimport sys\nfrom vramancer.cli.main import main\nsys.exit(main())\n"
    )
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for script in (vrm, python):
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(SRC),
        HOME=str(home),
        VRM_DATA_DIR=str(tmp / "data"),
        VRM_URL=f"http://127.0.0.1:{port}",
        VRM_SERVER__PORT=str(port),
        COLUMNS="160",
    )
    env.pop("XDG_DATA_HOME", None)
    if not has_nvidia_gpu():
        config = tmp / "vramancer.toml"
        config.write_text(SIMULATED_GPU)
        env["VRM_CONFIG"] = str(config)
    return Shell(work, env)


@contextmanager
def daemon(shell: Shell, **env: str) -> Iterator[Running]:
    """The set-up line's ``vramancer serve``, until the block ends; then it must stop cleanly
    on SIGTERM (uvicorn ends with the signal's status once it has shut down)."""
    serve = shell.start(serve_command(), **env)
    try:
        wait_http(f"{shell.env['VRM_URL']}/healthz", timeout=60, proc=serve.proc)
        yield serve
    except BaseException:
        serve.stop(signal.SIGKILL)
        raise
    out = serve.stop()
    code = serve.proc.returncode
    assert code in (0, -signal.SIGTERM), f"serve ended with {code}:\n{out}"
    assert "Application shutdown complete" in out, out


def run_live(shell: Shell, line: str, pattern: str) -> str:
    """Run a live command until its output shows ``pattern``, then press Ctrl-C."""
    live = shell.start(line)
    try:
        wait_for(
            lambda: re.search(pattern, live.output(), re.M),
            timeout=60,
            what=f"`{line}` showing {pattern!r}",
            interval=0.2,
        )
    finally:
        out = live.stop(signal.SIGINT)
    code = live.proc.returncode
    assert code == 0, f"`{line}` ended with {code} on Ctrl-C:\n{out}"
    return out


def check(line: str, out: str, pattern: str | None = None) -> None:
    pattern = pattern or EXPECTED[line]
    assert re.search(pattern, out, re.M), f"`{line}` did not show {pattern!r}:\n{out}"


def test_the_readme_examples_are_the_ones_tested() -> None:
    assert use_commands() == list(EXPECTED), (
        "README.md's Use examples changed: run the new lines here (EXPECTED) as well"
    )
    assert len(blocks(section(readme(), "Use"), "python")) == len(PYTHON_EXPECTED)
    assert serve_command() == "vramancer serve"
    assert all(HUB in line for line in POOL)


def test_the_use_section_runs_as_written(tmp_path: Path) -> None:
    port = free_port()
    shell = make_shell(tmp_path, port)
    (shell.cwd / "train.py").write_text(TRAIN_PY)
    (shell.cwd / "page.bin").write_bytes(os.urandom(4096))
    ran = []
    with daemon(shell):
        for line in use_commands():
            if line in POOL:
                continue
            out = run_live(shell, line, EXPECTED[line]) if line in LIVE else shell.run(line)
            check(line, out)
            ran.append(line)
        with_daemon = run_python_blocks(shell, daemon_running=True)
    without_daemon = run_python_blocks(shell, daemon_running=False)
    assert ran == [line for line in EXPECTED if line not in POOL]
    assert with_daemon + without_daemon == len(PYTHON_EXPECTED)


def run_python_blocks(shell: Shell, *, daemon_running: bool) -> int:
    """Run the Use section's python blocks meant for this state of the daemon; how many ran."""
    count = 0
    snippets = blocks(section(readme(), "Use"), "python")
    for i, (code, (needs_daemon, pattern)) in enumerate(
        zip(snippets, PYTHON_EXPECTED, strict=True)
    ):
        if needs_daemon != daemon_running:
            continue
        script = shell.cwd / f"readme_example_{i}.py"
        script.write_text(code)
        out = shell.run(f"python {script.name}")
        check(f"the README's python block {i + 1}", out.strip(), pattern)
        count += 1
    return count


def test_the_pool_lines_run_against_a_real_nats_server(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    port = free_port()
    shell = make_shell(tmp_path, port)
    [worker_line] = [line for line in use_commands() if line in POOL]
    with daemon(shell, VRM_NATS_URL=nats_server.url):
        worker = shell.start(
            worker_line.replace(HUB, nats_server.url), VRM_DATA_DIR=str(tmp_path / "worker")
        )
        try:
            out = wait_for(
                lambda: _listed(shell.run("vramancer nodes"), "box-3090"),
                timeout=60,
                what="the worker box-3090 listed up by `vramancer nodes`",
                interval=0.5,
                on_timeout=lambda: print(worker.output()),
            )
            check("vramancer nodes", out)
            assert worker.proc.poll() is None, worker.output()
        finally:
            worker_out = worker.stop()
        code = worker.proc.returncode
        assert code == 0, f"the worker ended with {code} on SIGTERM:\n{worker_out}"
        check(worker_line, worker_out)


def _listed(nodes_out: str, name: str) -> str | None:
    """The output of ``vramancer nodes`` once it lists ``name`` as up."""
    return nodes_out if re.search(rf"^{re.escape(name)}\s+up\b", nodes_out, re.M) else None
