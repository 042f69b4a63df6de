"""``vramancer mcp``: an MCP server on stdio for AI agents (see docs/mcp.md).

Its tools talk to the running daemon at ``VRM_URL`` with the token ``VRM_API_TOKEN``
(``vramancer.Client``), so what a tool may change follows that token's role: ``submit_task``
needs an operator token; every other tool only reads (viewer). A refusal of the daemon
(401/403) comes back as a tool error that says so; an unreachable daemon too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vramancer._version import __version__
from vramancer.client import Client
from vramancer.errors import Forbidden, VramancerError

INSTRUCTIONS = (
    "VRAMancer decides which models, jobs and data blocks live in which GPU or host memory. "
    "These tools read its state (status, list_models, list_tasks, task_logs, release_status) "
    "and queue work on its GPUs (submit_task, which needs an operator token)."
)


def _guarded(client: Client, fn: Callable[[Client], Any], needs: str) -> Any:
    """``fn(client)``; a daemon's refusal or error becomes a ``ToolError`` saying so."""
    from mcp.server.mcpserver.exceptions import ToolError

    try:
        return fn(client)
    except Forbidden as exc:
        raise ToolError(
            f"the VRAMancer daemon refused this (HTTP {exc.http_status}): {exc.message}. "
            f"This tool needs {needs} token in VRM_API_TOKEN."
        ) from None
    except VramancerError as exc:
        raise ToolError(f"VRAMancer: {exc.message}") from None


def build_server(client: Client) -> Any:
    """The MCP server and its tools, over ``client``."""
    from mcp.server.mcpserver import MCPServer
    from mcp_types import ToolAnnotations

    server = MCPServer("vramancer", instructions=INSTRUCTIONS, version=__version__)
    reads = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(annotations=reads)
    def status() -> dict[str, Any]:
        """The machine now: the daemon's health, each GPU's memory (total, used, reserved),
        host memory and pressure. Reads only."""

        def get(c: Client) -> dict[str, Any]:
            return {"health": c.health(), "resources": c.resources()}

        result: dict[str, Any] = _guarded(client, get, "a viewer")
        return result

    @server.tool(annotations=reads)
    def list_models() -> dict[str, Any]:
        """The models VRAMancer manages, with their state (loaded, unloaded ...), device and
        VRAM. Reads only."""
        return {"models": _guarded(client, lambda c: c.models(), "a viewer")}

    @server.tool(annotations=reads)
    def list_tasks(state: str | None = None, limit: int = 20) -> dict[str, Any]:
        """The newest tasks first (``state``: only those in it: queued, running, done, failed,
        cancelled ...; ``limit``: at most this many, 1 to 1000). Reads only."""
        return {"tasks": _guarded(client, lambda c: c.tasks(state, limit=limit), "a viewer")}

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False))
    def submit_task(
        command: list[str] | None = None,
        shell: str | None = None,
        vram: str | None = None,
        gpu: int | None = None,
        cwd: str | None = None,
        release: str | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """CHANGES STATE: queues a new task that RUNS A COMMAND on this machine, on a GPU when
        ``vram`` is given (``"4GiB"``), and answers its id and state. Give ``command`` (the
        program and its arguments) or ``shell`` (one shell line). ``cwd``: an absolute
        directory to run in (default: an empty scratch directory); ``release``: run in a
        release's checkout instead (``current``, ``candidate`` or a release's name).
        ``gpu``: pin to one GPU index; ``timeout_s``: kill it after this long. Needs an operator
        token; nothing else is changed."""
        from mcp.server.mcpserver.exceptions import ToolError

        if (command is None) == (shell is None):
            raise ToolError("give command (a list: program and arguments) or shell, not both")
        body: dict[str, Any] = (
            {"type": "cmd", "cmd": command}
            if command is not None
            else {"type": "shell", "shell": shell}
        )
        extra = {"vram": vram, "gpu": gpu, "cwd": cwd, "release": release, "timeout": timeout_s}
        body.update({k: v for k, v in extra.items() if v is not None})

        def submit(c: Client) -> dict[str, Any]:
            task_id = c.request("POST", "/api/tasks/submit", json=body)["task_id"]
            return c.task(task_id)

        result: dict[str, Any] = _guarded(client, submit, "an operator")
        return result

    @server.tool(annotations=reads)
    def task_logs(task_id: str) -> dict[str, Any]:
        """The stdout and stderr of a task's latest attempt, and its state (only the task's
        owner's token or an admin's may read them). Reads only."""
        result: dict[str, Any] = _guarded(
            client, lambda c: c.logs(task_id), "the task owner's or an admin's"
        )
        return result

    @server.tool(annotations=reads)
    def release_status() -> dict[str, Any]:
        """The release agent: which release is current, which is the candidate waiting to be
        accepted, and each release's commit, build and test results. Reads only (accepting a
        release is left to a person: ``vramancer release accept``)."""
        result: dict[str, Any] = _guarded(
            client, lambda c: c.request("GET", "/v1/release"), "a viewer"
        )
        return result

    return server


def serve_stdio() -> None:
    """Run the server on stdin/stdout until the client closes them."""
    with Client() as client:
        build_server(client).run("stdio")


def mcp() -> None:
    """Serve VRAMancer's tools to AI agents over MCP on stdio (VRM_URL, VRM_API_TOKEN)."""
    try:
        import mcp.server.mcpserver  # noqa: F401
    except ImportError:
        from vramancer.cli.common import fail

        fail("vramancer mcp needs the mcp package: pip install 'vramancer[mcp]'", code=2)
    serve_stdio()


def register(app: Any) -> None:
    """Add ``vramancer mcp`` to the root vramancer app."""
    app.command("mcp")(mcp)
