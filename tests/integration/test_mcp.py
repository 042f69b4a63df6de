"""``vramancer mcp`` through the MCP SDK's own stdio client, against a real ``vramancer
serve``: the tools list, reads, a submitted task, and a viewer token's refusal."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.helpers import ServerProcess, start_server

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = { "op" = "operator", "view" = "viewer" }

[devices]
backends = []
[[devices.simulated]]
name = "sim0"
memory = "8GiB"
"""
TOOLS = {"status", "list_models", "list_tasks", "submit_task", "task_logs", "release_status"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("mcp"), CONFIG)
    try:
        yield proc
    finally:
        proc.kill()
        if proc.proc.stdout:
            proc.proc.stdout.close()


@asynccontextmanager
async def session(server: ServerProcess, token: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "vramancer.main", "--mode", "cli", "mcp"],
        env={
            "VRM_URL": server.url,
            "VRM_API_TOKEN": token,
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        },
    )
    with open(os.devnull, "w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as client,
        ):
            await client.initialize()
            yield client


def payload(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    if result.structured_content is not None:
        return dict(result.structured_content)
    data: dict[str, Any] = json.loads(result.content[0].text)
    return data


def text(result: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


async def test_tools_read_and_submit_as_an_operator(server: ServerProcess) -> None:
    async with session(server, "op") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        assert "CHANGES STATE" in (tools["submit_task"].description or "")
        assert "Reads only" in (tools["list_tasks"].description or "")

        status = payload(await client.call_tool("status", {}))
        assert status["health"]["status"] == "ok"
        assert [g["name"] for g in status["resources"]["gpus"]] == ["Simulated GPU sim0"]
        assert payload(await client.call_tool("list_models", {}))["models"] == []
        release = payload(await client.call_tool("release_status", {}))
        assert release["configured"] is False and release["current"] is None

        task = payload(
            await client.call_tool("submit_task", {"shell": "echo hello from mcp", "vram": "1GiB"})
        )
        task_id = task["task_id"]

        async def ended() -> bool:
            listed = payload(await client.call_tool("list_tasks", {"limit": 5}))["tasks"]
            return any(t["task_id"] == task_id and t["state"] == "done" for t in listed)

        for _ in range(300):
            if await ended():
                break
            await asyncio.sleep(0.1)
        assert await ended()
        logs = payload(await client.call_tool("task_logs", {"task_id": task_id}))
        assert logs["stdout"] == "hello from mcp\n"

        both = await client.call_tool("submit_task", {"shell": "true", "command": ["true"]})
        assert both.is_error and "not both" in text(both)


async def test_a_viewer_token_cannot_submit(server: ServerProcess) -> None:
    async with session(server, "view") as client:
        refused = await client.call_tool("submit_task", {"command": ["true"]})
        assert refused.is_error
        message = text(refused)
        assert "refused" in message and "HTTP 403" in message and "operator token" in message
        assert payload(await client.call_tool("list_tasks", {}))["tasks"] is not None


async def test_an_unreachable_daemon_is_a_tool_error(server: ServerProcess) -> None:
    gone = ServerProcess(server.proc, "http://127.0.0.1:9", 9, server.data_dir, server.config_path)
    async with session(gone, "op") as client:
        result = await client.call_tool("status", {})
        assert result.is_error and "cannot reach VRAMancer" in text(result)
