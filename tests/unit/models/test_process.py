"""The process backend with a real model-server script: started in its own process group,
ready when its health URL answers, stopped by killing the whole group."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.ollama import FakeOllama
from tests.helpers import free_port
from tests.unit.models.conftest import harness, seed_settings
from vramancer.errors import OperationTimeout
from vramancer.models.errors import BackendError
from vramancer.models.types import ModelState

SCRIPT = str(Path(__file__).with_name("model_server.py"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for us
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def server(name: str, tmp_path: Path, *extra: str, **kw: Any) -> tuple[dict[str, Any], Path]:
    port = free_port()
    info = tmp_path / f"{name}.json"
    spec = {
        "name": name,
        "backend": "process",
        "command": [sys.executable, SCRIPT, str(port), str(info), *extra],
        "health_url": f"http://127.0.0.1:{port}/health",
        "vram": "2GiB",
        **kw,
    }
    return spec, info


async def test_process_starts_is_healthy_and_its_group_is_killed(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    spec, info = server("srv", tmp_path, "--delay", "0.2", env={"MODEL_FLAVOUR": "x"})
    async with harness(seed_settings(fake_ollama.url, models=[spec])) as h:
        m = h.models
        status = await m.ensure_loaded("srv")
        assert status.state is ModelState.LOADED and status.device == "gpu:0"
        assert h.gpu_used() == 2 * 2**30
        pids = json.loads(info.read_text())
        assert pids["cuda"] == ""  # a simulated GPU: nothing may touch a real one
        assert alive(pids["pid"]) and alive(pids["child"])
        await m.ensure_unloaded("srv")
        assert wait_dead(pids["pid"]) and wait_dead(pids["child"])  # the whole group
        assert h.gpu_used() == 0
        await m.ensure_loaded("srv", "cpu")
        again = json.loads(info.read_text())
        assert again["pid"] != pids["pid"]
    assert wait_dead(again["pid"]) and wait_dead(again["child"])  # stopped with the manager


async def test_a_server_that_exits_reports_its_output(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    spec, _ = server("bad", tmp_path, "--exit", "3", max_load_retries=1)
    async with harness(seed_settings(fake_ollama.url, models=[spec])) as h:
        with pytest.raises(BackendError, match=r"exited with 3 .*cannot find the weights"):
            await h.models.ensure_loaded("bad", "cpu")
        assert h.models.state("bad") is ModelState.ERROR
        assert h.of("model_error")[0].data["operation"] == "load"


async def test_a_server_that_never_gets_healthy_times_out_and_is_killed(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    spec, info = server("stuck", tmp_path, "--delay", "30", load_timeout_s=1.5, max_load_retries=0)
    async with harness(seed_settings(fake_ollama.url, models=[spec])) as h:
        with pytest.raises(OperationTimeout):
            await h.models.ensure_loaded("stuck", "cpu")
        pids = json.loads(info.read_text())
        assert wait_dead(pids["pid"]) and wait_dead(pids["child"])
        assert h.models.state("stuck") is ModelState.ERROR


async def test_a_port_template_gives_each_start_a_free_port_and_an_endpoint(
    fake_ollama: FakeOllama,
) -> None:
    """``{port}`` in the command and health URL: an OpenAI-compatible server on a free port,
    whose base URL ``use()`` hands out."""
    import httpx

    spec = {
        "name": "srv",
        "backend": "process",
        "command": [sys.executable, "-m", "tests.fakes.openai_server", "--port", "{port}"],
        "health_url": "http://127.0.0.1:{port}/health",
        "vram": "1GiB",
    }
    async with harness(seed_settings(fake_ollama.url, models=[spec])) as h:
        async with h.models.use("srv") as handle:
            assert handle.endpoint is not None and handle.endpoint.startswith("http://127.0.0.1:")
            assert handle.endpoint != "http://127.0.0.1:{port}"
            async with httpx.AsyncClient() as client:
                models = (await client.get(handle.endpoint + "/v1/models")).json()
            assert models["data"][0]["id"] == "fake"
        await h.models.ensure_unloaded("srv")
        async with h.models.use("srv") as again:
            assert again.endpoint is not None
        await h.models.ensure_unloaded("srv")
        assert h.models.handle("srv") is None
