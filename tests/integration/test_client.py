"""``vramancer.Client`` against a real ``vramancer serve`` process: the routes a script uses,
tasks run to their end, error answers as the library's typed errors, tokens and ``VRM_URL``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import ServerProcess, free_port
from vramancer import Client
from vramancer.client import DEFAULT_URL, ServerUnreachable, server_url
from vramancer.config import DEFAULT_PORT, ServerSettings
from vramancer.errors import ConfigError, Forbidden, InvalidInput, NotFound

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = { "op" = "operator", "view" = "viewer" }

[devices]
backends = []
poll_interval_s = 0.2

[[devices.simulated]]
name = "sim0"
memory = "8GiB"
"""


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory(CONFIG)


def test_a_script_reads_the_machine_and_runs_a_task(server: ServerProcess, tmp_path: Path) -> None:
    with Client(server.url, "op") as vrm:
        assert vrm.health()["status"] == "ok"
        gpus = vrm.resources()["gpus"]
        assert [(g["name"], g["simulated"]) for g in gpus] == [("Simulated GPU sim0", True)]
        assert [d["name"] for d in vrm.devices()["devices"]] == ["Simulated GPU sim0"]
        assert vrm.models() == [] and vrm.profile()["name"] == "idle"
        switched = vrm.set_profile("recording")
        assert switched["ok"] and switched["steps"] == [] and vrm.profile()["name"] == "recording"
        task = vrm.run(
            sys.executable, "-c", "print('trained')", vram="1GiB", cwd=str(tmp_path), timeout_s=60
        )
        assert (task["state"], task["exit_code"], task["device"]) == ("done", 0, "gpu:0")
        assert vrm.logs(task["task_id"])["stdout"] == "trained\n"
        assert [t["task_id"] for t in vrm.tasks(state="done")] == [task["task_id"]]
        assert [n["state"] for n in vrm.nodes()] == ["up"]


def test_error_answers_are_typed_errors_and_change_nothing(server: ServerProcess) -> None:
    with Client(server.url, "op") as vrm:
        with pytest.raises(InvalidInput, match="vram") as bad:
            vrm.submit("true", vram="lots")
        assert bad.value.http_status == 422 and bad.value.code
        with pytest.raises(InvalidInput, match="command to run"):
            vrm.submit()
        with pytest.raises(NotFound, match="no profile 'recordnig'") as missing:
            vrm.set_profile("recordnig")
        assert missing.value.http_status == 404
        with pytest.raises(NotFound):
            vrm.task("no-such-task")
        assert vrm.tasks() == [] and vrm.profile()["name"] == "idle"
    with Client(server.url, "view") as viewer, pytest.raises(Forbidden, match="operator"):
        viewer.set_profile("recording")


def test_token_and_url_come_from_the_environment(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VRM_API_TOKEN", raising=False)
    monkeypatch.setenv("VRM_URL", f"127.0.0.1:{server.port}")
    with Client() as anonymous, pytest.raises(Forbidden, match="VRM_API_TOKEN") as denied:
        anonymous.resources()
    assert denied.value.http_status == 401
    monkeypatch.setenv("VRM_API_TOKEN", "view")
    with Client() as vrm:
        assert vrm.url == server.url and vrm.resources()["gpus"][0]["simulated"]


def test_no_daemon_and_a_bad_url_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url) as vrm, pytest.raises(ServerUnreachable, match="vramancer serve"):
        vrm.health()
    monkeypatch.setenv("VRM_URL", "ftp://box")
    with pytest.raises(ConfigError, match="VRM_URL: scheme 'ftp' is not http or https"):
        Client()
    monkeypatch.delenv("VRM_URL")
    assert server_url() == DEFAULT_URL
    assert f"http://{ServerSettings().host}:{DEFAULT_PORT}" == DEFAULT_URL


def test_a_task_runs_in_the_current_directory_unless_told_otherwise(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    pwd = (sys.executable, "-c", "import os; print(os.getcwd())")
    with Client(server.url, "op") as vrm:
        here = vrm.run(*pwd, timeout_s=60)
        assert vrm.logs(here["task_id"])["stdout"] == f"{tmp_path}\n"
        scratch = vrm.run(*pwd, scratch=True, timeout_s=60)
        assert vrm.logs(scratch["task_id"])["stdout"].rstrip().endswith(scratch["task_id"])
        with pytest.raises(InvalidInput, match="cwd or scratch"):
            vrm.submit(*pwd, cwd="/tmp", scratch=True)
