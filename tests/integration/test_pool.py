"""The pool of machines for real: a ``nats-server`` with JetStream, ``vramancer serve``
orchestrators and ``vramancer worker`` nodes as processes, tasks as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import chromium, dump_dom
from tests.helpers import ServerProcess, start_server
from tests.natsserver import NatsServer
from tests.poolprocs import (
    VRAMANCER,
    node_states,
    pool,
    pool_toml,
    start_worker,
    wait_for,
    wait_nodes_up,
)

pytestmark = pytest.mark.timeout(240)


def submit(hub: ServerProcess, **body: Any) -> str:
    response = httpx.post(hub.url + "/api/tasks/submit", json={"type": "cmd", **body}, timeout=30)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def status(hub: ServerProcess, task_id: str) -> dict[str, Any]:
    response = httpx.get(hub.url + "/api/tasks/status", params={"task_id": task_id}, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_ended(hub: ServerProcess, ids: list[str], timeout: float = 90.0) -> dict[str, dict]:
    ended: dict[str, dict] = {}

    def check() -> bool:
        for task_id in ids:
            if task_id not in ended:
                body = status(hub, task_id)
                if body["state"] in ("done", "failed", "cancelled"):
                    ended[task_id] = body
        return len(ended) == len(ids)

    try:
        wait_for(check, timeout, interval=0.2, what=f"{len(ids)} tasks ended")
    except TimeoutError:
        left = [status(hub, i)["state"] for i in ids if i not in ended][:5]
        stats = httpx.get(hub.url + "/api/tasks/stats", timeout=10).json()
        nodes = httpx.get(hub.url + "/v1/cluster/nodes", timeout=10).json()
        raise AssertionError(
            f"{len(ids) - len(ended)} tasks not ended, e.g. {left}; stats {stats}; {nodes}"
        ) from None
    return ended


def append_cmd(path: Path, text: str, sleep_s: float = 0.0) -> list[str]:
    code = f"import time; time.sleep({sleep_s}); open({str(path)!r}, 'a').write({text!r} + '\\n')"
    return [sys.executable, "-c", code]


def test_tasks_spread_over_both_workers_and_say_where_they_ran(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with pool(tmp_path, nats_server.url, {"box-a": 1, "box-b": 1}) as (hub, _):
        nodes = httpx.get(hub.url + "/v1/cluster/nodes", timeout=10).json()["nodes"]
        by_name = {n["name"]: n for n in nodes}
        assert by_name["box-a"]["devices"][0]["id"] == "box-a/gpu:0"
        assert by_name["box-a"]["devices"][0]["simulated"] is True
        out = tmp_path / "out.txt"
        ids = [submit(hub, cmd=append_cmd(out, f"t{i}", 0.3), vram="1GiB") for i in range(8)]
        ended = wait_ended(hub, ids)
        assert {b["state"] for b in ended.values()} == {"done"}
        assert {b["node"] for b in ended.values()} == {"box-a", "box-b"}
        for body in ended.values():
            assert body["device"] == f"{body['node']}/gpu:0"
        assert sorted(out.read_text().split()) == sorted(f"t{i}" for i in range(8))
        health = httpx.get(hub.url + "/healthz", timeout=10).json()
        assert health["nats"] == "connected"
        metrics = httpx.get(hub.url + "/metrics", timeout=10).text
        assert 'vramancer_pool_node_up{node="box-a"} 1.0' in metrics
        assert 'vramancer_pool_gpu_memory_total_bytes{device="box-b/gpu:0",node="box-b"}' in metrics
        view = subprocess.run(
            [VRAMANCER, "status", "--json"],
            env={**os.environ, "VRM_URL": hub.url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert view.returncode == 0, view.stderr
        assert {n["name"] for n in json.loads(view.stdout)["pool"]} == {"hub", "box-a", "box-b"}


def test_logs_come_from_the_node_that_ran_the_task_and_cancel_reaches_it(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # Reply subjects under a prefix of their own (what per-user NATS permissions need).
    inbox = {"inbox_prefix": "_INBOX_pooltest"}
    with pool(tmp_path, nats_server.url, {"box-a": 1}, nats=inbox) as (hub, _):
        code = "import sys; print('hello from the worker'); print('oops', file=sys.stderr)"
        task_id = submit(hub, cmd=[sys.executable, "-c", code])
        assert wait_ended(hub, [task_id])[task_id]["state"] == "done"
        logs = httpx.get(f"{hub.url}/api/tasks/{task_id}/logs", timeout=30).json()
        assert logs["stdout"] == "hello from the worker\n" and logs["stderr"] == "oops\n"
        # The README's command, through the pool: follows the task to its end, with its output.
        argv = [VRAMANCER, "submit", "--vram", "2GiB", "--node", "box-a", "--wait", "--"]
        followed = subprocess.run(
            [*argv, sys.executable, "-c", code],
            env={**os.environ, "VRM_URL": hub.url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert followed.returncode == 0, followed.stderr
        assert "hello from the worker" in followed.stdout
        marker = tmp_path / "not-reached"
        slow = f"import time; time.sleep(30); open({str(marker)!r}, 'w')"
        long_id = submit(hub, cmd=[sys.executable, "-c", slow])
        wait_for(lambda: status(hub, long_id)["state"] == "running", 30, what="running")
        started = time.monotonic()
        response = httpx.post(f"{hub.url}/api/tasks/{long_id}/cancel", timeout=30)
        assert response.status_code == 200, response.text
        body = wait_ended(hub, [long_id], timeout=30)[long_id]
        assert body["state"] == "cancelled" and time.monotonic() - started < 15
        assert not marker.exists()


def test_a_node_pin_and_what_no_node_can_run_are_refused_at_submit(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with pool(tmp_path, nats_server.url, {"box-a": 1, "box-b": 1}) as (hub, workers):
        out = tmp_path / "pinned.txt"
        ids = [submit(hub, cmd=append_cmd(out, "x"), node="box-b") for _ in range(3)]
        assert {b["node"] for b in wait_ended(hub, ids).values()} == {"box-b"}
        before = httpx.get(hub.url + "/api/tasks/history", timeout=10).json()["tasks"]
        for body, field in (
            ({"node": "nowhere"}, "node"),
            ({"vram": "48GiB"}, "vram"),
            ({"node": "box-a", "gpu": 3}, "gpu"),
        ):
            response = httpx.post(
                hub.url + "/api/tasks/submit",
                json={"type": "cmd", "cmd": ["true"], **body},
                timeout=30,
            )
            assert response.status_code == 422, response.text
            assert response.json()["error"]["field"] == field
        # A node that is down (no heartbeat for down_after_s): pinning to it is refused.
        workers["box-a"].kill()
        wait_for(lambda: node_states(hub).get("box-a") == "down", 30, what="box-a down")
        response = httpx.post(
            hub.url + "/api/tasks/submit",
            json={"type": "cmd", "cmd": ["true"], "node": "box-a"},
            timeout=30,
        )
        assert response.status_code == 422 and "down" in response.json()["error"]["message"]
        after = httpx.get(hub.url + "/api/tasks/history", timeout=10).json()["tasks"]
        assert len(after) == len(before)


def test_a_worker_killed_mid_task_its_task_runs_elsewhere_and_ends_done_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with pool(tmp_path, nats_server.url, {"box-a": 1, "box-b": 1}) as (hub, workers):
        out = tmp_path / "ids.txt"
        ids = [submit(hub, cmd=append_cmd(out, f"id{i}", 0.05)) for i in range(200)]
        wait_for(lambda: out.exists() and len(out.read_text().split()) >= 40, 90, what="40 ran")
        workers["box-a"].kill()
        ended = wait_ended(hub, ids, timeout=180)
        assert Counter(b["state"] for b in ended.values()) == {"done": 200}
        assert set(out.read_text().split()) == {f"id{i}" for i in range(200)}
        history = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = httpx.get(hub.url + "/api/tasks/history", params=params, timeout=30).json()
            history += page["tasks"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert Counter(t["task_id"] for t in history if t["state"] == "done") == Counter(ids)
        # The orchestrator's counts (what its dispatcher reads) follow every node's writes.
        counts = httpx.get(hub.url + "/api/tasks/stats", timeout=10).json()["counts"]
        assert counts["done"] == 200 and counts["running"] == counts["queued"] == 0
        # Tasks that ran after the kill ran on box-b.
        assert any(b["node"] == "box-b" for b in ended.values())


def test_nats_restart_mid_run_loses_nothing_and_everyone_resubscribes(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with pool(tmp_path, nats_server.url, {"box-a": 1, "box-b": 1}) as (hub, _):
        out = tmp_path / "restart.txt"
        first = [submit(hub, cmd=append_cmd(out, f"a{i}", 0.1)) for i in range(20)]
        nats_server.restart()
        wait_for(
            lambda: httpx.get(hub.url + "/healthz", timeout=10).json().get("nats") == "connected",
            30,
            what="hub reconnected",
        )
        wait_nodes_up(hub, "box-a", "box-b")
        second = [submit(hub, cmd=append_cmd(out, f"b{i}", 0.05)) for i in range(20)]
        ended = wait_ended(hub, first + second, timeout=120)
        assert {b["state"] for b in ended.values()} == {"done"}
        names = set(out.read_text().split())
        assert names >= {f"a{i}" for i in range(20)} | {f"b{i}" for i in range(20)}
        counts = httpx.get(hub.url + "/api/tasks/stats", timeout=10).json()["counts"]
        assert counts["done"] == 40 and counts["scheduled"] == counts["running"] == 0


def test_while_nats_is_down_submits_get_503_and_reads_answer(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with pool(tmp_path, nats_server.url, {"box-a": 1}) as (hub, _):
        task_id = submit(hub, cmd=["true"])
        wait_ended(hub, [task_id])
        nats_server.stop()
        wait_for(
            lambda: (
                httpx.get(hub.url + "/healthz", timeout=10).json().get("nats") == "disconnected"
            ),
            30,
            what="hub sees NATS down",
        )
        response = httpx.post(
            hub.url + "/api/tasks/submit", json={"type": "cmd", "cmd": ["true"]}, timeout=30
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "nats_unavailable"
        assert status(hub, task_id)["state"] == "done"
        assert "box-a" in node_states(hub)
        nats_server.start()
        wait_for(
            lambda: httpx.get(hub.url + "/healthz", timeout=10).json().get("nats") == "connected",
            30,
            what="hub reconnected",
        )
        wait_ended(hub, [submit(hub, cmd=["true"])])


def test_two_orchestrators_dispatch_no_task_twice_and_one_takes_over(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with pool(tmp_path, nats_server.url, {"box-a": 1, "box-b": 1}) as (hub, _):
        hub2 = start_server(
            tmp_path, pool_toml(nats_server.url, "hub2"), data_dir=tmp_path / "hub2"
        )
        try:
            out = tmp_path / "two.txt"
            ids = [
                submit(hub if i % 2 else hub2, cmd=append_cmd(out, f"t{i}", 0.02))
                for i in range(60)
            ]
            hub.kill()  # whichever held the dispatch lease, the other goes on
            ended = wait_ended(hub2, ids, timeout=120)
            assert {b["state"] for b in ended.values()} == {"done"}
            lines = out.read_text().split()
            assert Counter(lines) == Counter(f"t{i}" for i in range(60)), "a task ran twice"
            # A lease the killed orchestrator wrote but never sent runs out and is leased
            # again (a new attempt); nothing else takes two.
            assert sum(b["attempts"] > 1 for b in ended.values()) <= 2
        finally:
            hub2.kill()
            if hub2.proc.stdout:
                hub2.proc.stdout.close()


def test_a_worker_cut_off_goes_stale_its_task_runs_again_and_its_late_result_is_ignored(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # The node goes stale (2 s) before its lease runs out (4 s): the task goes to box-b.
    with pool(tmp_path, nats_server.url, {"box-a": 1}, lease_s=4.0) as (hub, workers):
        out = tmp_path / "late.txt"
        # The first attempt fails (late); any later one succeeds.
        code = (
            "import os, time; time.sleep(5); "
            f"open({str(out)!r}, 'a').write(os.environ['VRM_TASK_ATTEMPT'] + '\\n'); "
            "raise SystemExit(3 if os.environ['VRM_TASK_ATTEMPT'] == '1' else 0)"
        )
        task_id = submit(hub, cmd=[sys.executable, "-c", code], max_retries=0)
        wait_for(lambda: status(hub, task_id)["state"] == "running", 30, what="running")
        assert status(hub, task_id)["node"] == "box-a"
        workers["box-b"] = start_worker(
            tmp_path, "box-b", pool_toml(nats_server.url, "box-b", gpus=1, lease_s=4.0)
        )
        wait_nodes_up(hub, "box-b")
        workers["box-a"].signal(signal.SIGSTOP)
        wait_for(lambda: node_states(hub).get("box-a") == "stale", 30, what="box-a stale")
        wait_for(
            lambda: (
                status(hub, task_id)["node"] == "box-b"
                and status(hub, task_id)["state"] == "running"
            ),
            30,
            what="the task running again on box-b",
        )
        body = status(hub, task_id)
        assert body["lease_losses"] == 1  # a lost lease is not a failed try
        workers["box-a"].signal(signal.SIGCONT)  # its attempt 1 reports exit 3, late
        ended = wait_ended(hub, [task_id], timeout=60)[task_id]
        assert (ended["state"], ended["node"], ended["exit_code"]) == ("done", "box-b", 0)
        time.sleep(1.5)  # box-a has had time to report
        assert status(hub, task_id)["state"] == "done"
        assert sorted(out.read_text().split()) == ["1", "2"]


def _sh(*argv: str) -> None:
    import subprocess

    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts() -> Any:
    """Two network namespaces, each a "host" with its own address on its own veth link to
    this namespace (10.231.N.2, reaching 10.231.N.1 here); skipped where they cannot be made."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    tag = f"{os.getpid() % 10000}"
    made: list[str] = []
    try:
        for n in (1, 2):
            ns, here, there = f"vrm{tag}h{n}", f"vrm{tag}a{n}", f"vrm{tag}b{n}"
            _sh("ip", "netns", "add", ns)
            made.append(ns)
            _sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            _sh("ip", "link", "set", there, "netns", ns)
            _sh("ip", "addr", "add", f"10.231.{n}.1/24", "dev", here)
            _sh("ip", "link", "set", here, "up")
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.231.{n}.2/24", "dev", there)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", there, "up")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {exc}")
    yield made
    for ns in made:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_two_workers_on_two_hosts_over_their_own_links(
    tmp_path: Path, nats_server: NatsServer, two_hosts: list[str]
) -> None:
    server = NatsServer(nats_server.binary, tmp_path / "store-any", host="0.0.0.0")
    server.start()
    hub = start_server(tmp_path, pool_toml(f"nats://127.0.0.1:{server.port}", "hub"))
    workers = []
    try:
        for n, ns in enumerate(two_hosts, start=1):
            url = f"nats://10.231.{n}.1:{server.port}"
            name = f"host{n}"
            workers.append(
                start_worker(
                    tmp_path,
                    name,
                    pool_toml(url, name, gpus=1),
                    prefix=["ip", "netns", "exec", ns],
                )
            )
        wait_nodes_up(hub, "host1", "host2", timeout=60)
        out = tmp_path / "hosts.txt"
        code = f"import os; open({str(out)!r}, 'a').write(os.environ['VRM_DEVICE'] + '\\n')"
        ids = [
            submit(hub, cmd=[sys.executable, "-c", code], node=f"host{1 + i % 2}") for i in range(6)
        ]
        ended = wait_ended(hub, ids)
        assert {b["node"] for b in ended.values()} == {"host1", "host2"}
        assert {b["state"] for b in ended.values()} == {"done"}
    finally:
        for worker in workers:
            worker.kill()
        hub.kill()
        if hub.proc.stdout:
            hub.proc.stdout.close()
        server.stop()


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no headless chromium on this machine")
def test_the_dashboard_shows_every_node_of_the_pool(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with pool(tmp_path, nats_server.url, {"box-a": 1, "box-b": 2}) as (hub, _):
        task_id = submit(hub, cmd=["true"], node="box-b")
        wait_ended(hub, [task_id])
        dom = dump_dom(hub.url + "/", tmp_path / "chromium")
    section = dom[dom.index('id="pool-section"') : dom.index('<table id="models">')]
    assert "hidden" not in section.split(">", 1)[0]
    for text in ("box-a", "box-b/gpu:1", "3 nodes", ">up<"):
        assert text in section, text
    tasks = dom[dom.index('<table id="tasks">') :]
    assert "box-b/gpu:0" in tasks


def test_a_node_never_runs_more_vram_than_its_gpu_has(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """24 GiB GPUs, four slots each, tasks of 10 GiB: at most two run at once on a GPU."""
    with pool(tmp_path, nats_server.url, {"box-a": 1, "box-b": 1}, slots_per_device=4) as (hub, _):
        out = tmp_path / "spans.txt"
        line = "f\"{os.environ['VRM_TASK_ID']} {t0} {time.time()}\\n\""
        code = (
            "import os, time; t0 = time.time(); time.sleep(0.8); "
            f"open({str(out)!r}, 'a').write({line})"
        )
        ids = [submit(hub, cmd=[sys.executable, "-c", code], vram="10GiB") for _ in range(10)]
        ended = wait_ended(hub, ids, timeout=120)
        assert {b["state"] for b in ended.values()} == {"done"}
        spans = {}
        for line in out.read_text().split("\n"):
            if line:
                task_id, start, end = line.split()
                spans[task_id] = (float(start), float(end))
        for node in ("box-a", "box-b"):
            mine = [spans[t] for t, b in ended.items() if b["node"] == node]
            most = max(sum(1 for s, e in mine if s <= start < e) for start, _ in mine)
            assert most <= 2, (node, mine)


def test_poison_is_terminated_and_an_undeliverable_message_is_dead_lettered(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    import asyncio

    import nats

    async def scenario() -> tuple[int, list[tuple[bytes, str]]]:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.publish("vrm.work.box-a", b"not json", stream="VRM_WORK")
        ghost = b'{"task_id":"no-such-task","lease_token":1,"device":"box-a/gpu:0"}'
        await js.publish("vrm.work.box-a", ghost, stream="VRM_WORK")
        dead: list[tuple[bytes, str]] = []
        for _ in range(200):  # max_deliver (5) deliveries a second apart, then the dead letter
            info = await js.stream_info("VRM_DEAD")
            if info.state.messages:
                msg = await js.get_msg("VRM_DEAD", seq=info.state.first_seq)
                dead.append((msg.data or b"", (msg.headers or {}).get("Vrm-Reason", "")))
                break
            await asyncio.sleep(0.1)
        work = await js.stream_info("VRM_WORK")
        await nc.close()
        return work.state.messages, dead

    with pool(tmp_path, nats_server.url, {"box-a": 1}) as (hub, _):
        left, dead = asyncio.run(scenario())
        assert dead == [
            (
                b'{"task_id":"no-such-task","lease_token":1,"device":"box-a/gpu:0"}',
                "delivered too many times",
            )
        ]
        assert left == 0  # the poison was terminated, the ghost moved out
        # The worker goes on: a real task still runs.
        assert wait_ended(hub, [submit(hub, cmd=["true"])])


def test_an_orchestrator_started_while_nats_is_down_starts_and_catches_up(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    nats_server.stop()
    hub = start_server(tmp_path, pool_toml(nats_server.url, "hub"))
    worker = None
    try:
        health = httpx.get(hub.url + "/healthz", timeout=10).json()
        assert (health["status"], health["nats"]) == ("ok", "disconnected")
        response = httpx.post(
            hub.url + "/api/tasks/submit", json={"type": "cmd", "cmd": ["true"]}, timeout=30
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "nats_unavailable"
        nats_server.start()
        worker = start_worker(tmp_path, "box-a", pool_toml(nats_server.url, "box-a", gpus=1))
        wait_nodes_up(hub, "box-a")
        assert wait_ended(hub, [submit(hub, cmd=["true"])])
    finally:
        if worker is not None:
            worker.kill()
        hub.kill()
        if hub.proc.stdout:
            hub.proc.stdout.close()


def test_a_task_that_ends_while_nats_is_down_is_recorded_once_it_returns(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with pool(tmp_path, nats_server.url, {"box-a": 1}, lease_s=3.0) as (hub, _):
        out = tmp_path / "ran.txt"
        task_id = submit(hub, cmd=append_cmd(out, "ran", 1.5))
        wait_for(lambda: status(hub, task_id)["state"] == "running", 30, what="running")
        nats_server.stop()
        time.sleep(4.5)  # the task ends meanwhile; its lease has run out by the clock
        nats_server.start()
        body = wait_ended(hub, [task_id], timeout=60)[task_id]
        assert (body["state"], body["attempts"], body["lease_losses"]) == ("done", 1, 0)
        time.sleep(2.0)
        assert out.read_text().split() == ["ran"]  # it ran once
