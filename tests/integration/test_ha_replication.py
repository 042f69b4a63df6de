"""HA replication between two real ``vramancer serve`` processes: a standby answers as the
primary does, refuses writes naming the primary, refuses forged, replayed, stale and old-epoch
deltas (applying nothing), keeps every acknowledged task in sync mode across a SIGKILL, lets an
old primary come back as standby, and keeps journal segments until every peer acked them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.helpers import wait_for
from tests.integration.ha_helpers import (
    CONFIG,
    SECRET,
    Node,
    all_blocks,
    all_history,
    caught_up,
    make_pair,
    start,
)
from tests.promtext import metric_value
from vramancer.cli.main import app
from vramancer.replication.delta import Delta, new_nonce, seal
from vramancer.replication.keys import hour_key, hour_of
from vramancer.replication.kinds import DeltaKind, pack

pytestmark = pytest.mark.integration


def submit_echo(c: httpx.Client, n: int, tag: str) -> list[str]:
    tasks = [{"type": "cmd", "cmd": ["echo", f"{tag}-{i}"]} for i in range(n)]
    r = c.post("/api/tasks/submit_batch", json={"tasks": tasks})
    assert r.status_code == 200, r.text
    return list(r.json()["task_ids"])


def views(c: httpx.Client, task_ids: list[str]) -> dict[str, Any]:
    """What a client sees of the replicated state."""
    return {
        "status": [c.get("/api/tasks/status", params={"task_id": t}).json() for t in task_ids],
        "history": all_history(c),
        "blocks": all_blocks(c),
        "profile": c.get("/v1/profile").json(),
        "stats": c.get("/api/tasks/stats").json()["counts"],
    }


def mixed_changes(c: httpx.Client, rounds: int) -> list[str]:
    """Tasks run to done or cancelled, blocks put, replaced and deleted, a profile switch."""
    ids: list[str] = []
    for r in range(rounds):
        ids += submit_echo(c, 20, f"r{r}")
        for b in range(10):
            put = c.put(
                f"/v1/memory/blocks/r{r}/b{b}",
                content=os.urandom(100 + b),
                params={"durable": "true", "priority": b % 3},
            )
            assert put.status_code == 200, put.text
        assert c.delete(f"/v1/memory/blocks/r{r}/b3").status_code == 200
        c.put(f"/v1/memory/blocks/r{r}/b4", content=b"replaced", params={"durable": "true"})
    assert c.put("/v1/profile", json={"name": "quiet"}).status_code == 200
    return ids


def ended(c: httpx.Client, ids: list[str]) -> bool:
    counts = c.get("/api/tasks/stats").json()["counts"]
    return counts["done"] + counts["failed"] + counts["cancelled"] >= len(ids)


def test_standby_answers_as_the_primary_and_refuses_writes(
    tmp_path: Path, server_factory: Any
) -> None:
    primary, standby = make_pair(tmp_path)
    start(standby, server_factory)
    start(primary, server_factory)
    with primary.client() as p, standby.client() as s:
        ids = mixed_changes(p, rounds=6)
        wait_for(lambda: ended(p, ids), 60, "tasks to end")

        def same() -> bool:
            return caught_up(p, s) and views(p, ids) == views(s, ids)

        wait_for(same, 30, "the standby to answer as the primary")
        seen = views(s, ids)
        assert seen["profile"]["name"] == "quiet"
        assert seen["profile"]["last_switch"]["name"] == "quiet"
        assert {t["state"] for t in seen["status"]} == {"done"}
        assert len(seen["history"]) == len(ids) == 120
        assert len(seen["blocks"]) == 54
        assert s.get("/v1/memory/blocks/r0/b4").content == b"replaced"
        assert p.get("/v1/memory/blocks/r9/b9").content == s.get("/v1/memory/blocks/r9/b9").content
        for method, path, kwargs in [
            ("POST", "/api/tasks/submit", {"json": {"type": "cmd", "cmd": ["echo"]}}),
            ("PUT", "/v1/memory/blocks/x", {"content": b"x"}),
            ("DELETE", "/v1/memory/blocks/r0/b0", {}),
            ("PUT", "/v1/profile", {"json": {"name": "idle"}}),
        ]:
            r = s.request(method, path, **kwargs)
            assert r.status_code == 409, (path, r.text)
            assert r.json()["error"]["code"] == "standby"
            assert r.json()["error"]["primary"] == primary.address
        status = s.get("/v1/ha/status").json()
        assert status["role"] == "standby" and status["epoch"] == 1
        peers = p.get("/v1/ha/status").json()["peers"]
        assert peers == [
            {"address": standby.address, "acked_seq": status["last_seq"], "lag": 0, "state": "up"}
        ]


# ------------------------------------------------------------------------------ refusals


def record(seq: int, *, epoch: int = 1, hour: int | None = None, block: str = "x") -> bytes:
    hour = hour_of(time.time()) if hour is None else hour
    payload = pack({"block": {"id": block, "priority": 0, "hint": None}}, b"forged?")
    delta = Delta(seq, epoch, hour, new_nonce(), DeltaKind.BLOCK.value, payload)
    return seal(delta, hour_key(SECRET.encode(), hour))


def test_bad_replayed_stale_and_old_epoch_deltas_are_refused(
    tmp_path: Path, server_factory: Any
) -> None:
    _, standby = make_pair(tmp_path)  # its primary never starts: the test sends the deltas
    start(standby, server_factory)
    with standby.client() as s:

        def post(body: bytes) -> httpx.Response:
            return s.post(
                "/v1/ha/deltas", content=body, headers={"Content-Type": "application/octet-stream"}
            )

        def rejected(reason: str) -> float:
            return (
                metric_value(
                    s.get("/metrics").text, "vramancer_ha_deltas_rejected_total", reason=reason
                )
                or 0.0
            )

        flipped = bytearray(record(1, block="flipped"))
        flipped[-40] ^= 0x01
        stale = record(1, hour=hour_of(time.time()) - 2, block="stale")
        cases = [(bytes(flipped), 401, "bad_signature"), (stale, 401, "stale_key")]
        for body, status, code in cases:
            r = post(body)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
            assert rejected(code) == 1
        good = record(1, epoch=2, block="good")
        assert post(good).status_code == 200
        r = post(good)
        assert (r.status_code, r.json()["error"]["code"]) == (409, "replayed")
        old = record(2, epoch=1, block="old-epoch")
        r = post(old)
        assert (r.status_code, r.json()["error"]["code"]) == (409, "stale_epoch")
        assert r.json()["error"]["acked_seq"] == 1
        assert rejected("replayed") == 1 and rejected("stale_epoch") == 1
        assert s.get("/v1/memory/blocks/good").content == b"forged?"
        for refused in ("flipped", "stale", "old-epoch"):
            assert s.get(f"/v1/memory/blocks/{refused}").status_code == 404
        assert s.get("/v1/ha/status").json()["last_seq"] == 1


# ------------------------------------------------------------------------------ failover


def test_sync_mode_keeps_every_acknowledged_submit_across_a_sigkill(
    tmp_path: Path, server_factory: Any
) -> None:
    primary, standby = make_pair(tmp_path, sync=True)
    start(standby, server_factory)
    start(primary, server_factory)
    acked: list[str] = []
    stop = threading.Event()

    def burst() -> None:
        with primary.client() as c:
            i = 0
            while not stop.is_set():
                try:
                    r = c.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["echo", str(i)]})
                except httpx.HTTPError:
                    return
                if r.status_code < 300:
                    acked.append(r.json()["task_id"])
                i += 1

    workers = [threading.Thread(target=burst) for _ in range(3)]
    for w in workers:
        w.start()
    wait_for(lambda: len(acked) >= 60, 30, "submits to be acknowledged")
    assert primary.server is not None
    primary.server.kill(signal.SIGKILL)
    stop.set()
    for w in workers:
        w.join(10)
    with standby.client() as s:
        promoted = s.post("/v1/ha/promote").json()
        assert (promoted["role"], promoted["epoch"]) == ("primary", 2)
        missing = [
            t for t in acked if s.get("/api/tasks/status", params={"task_id": t}).status_code != 200
        ]
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged tasks are missing"
        # The promoted node runs them: it dispatches now.
        wait_for(
            lambda: s.get("/api/tasks/stats").json()["counts"]["done"] >= len(acked),
            60,
            "the promoted node to run the tasks",
        )


def test_sync_mode_without_a_peer_refuses_with_no_replica(
    tmp_path: Path, server_factory: Any
) -> None:
    primary, _ = make_pair(tmp_path, sync=True)  # the standby is never started
    start(primary, server_factory)
    with primary.client() as p:
        r = p.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["echo"]})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "no_replica"
        assert p.get("/api/tasks/history").status_code == 200


def test_old_primary_comes_back_as_standby_and_catches_up(
    tmp_path: Path, server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, standby = make_pair(tmp_path)
    start(standby, server_factory)
    start(primary, server_factory)
    with primary.client() as p, standby.client() as s:
        before = submit_echo(p, 10, "before")
        wait_for(lambda: ended(p, before), 30, "tasks to end")
        wait_for(lambda: caught_up(p, s) and all_history(p) == all_history(s), 20, "replication")
    assert primary.server is not None
    primary.server.kill(signal.SIGKILL)
    monkeypatch.setenv("VRM_URL", f"http://{standby.address}")
    monkeypatch.delenv("VRM_API_TOKEN", raising=False)
    promoted = CliRunner().invoke(app, ["ha", "promote", "--json"])
    assert promoted.exit_code == 0, promoted.output
    assert json.loads(promoted.output)["epoch"] == 2
    with standby.client() as s:
        shown = CliRunner().invoke(app, ["ha", "status", "--json"])
        assert json.loads(shown.output) == s.get("/v1/ha/status").json()
        assert "role primary, epoch 2" in CliRunner().invoke(app, ["ha", "status"]).output
        after = submit_echo(s, 10, "after")
        s.put("/v1/memory/blocks/after", content=b"new", params={"durable": "true"})
        wait_for(lambda: ended(s, before + after), 30, "tasks to end on the new primary")
    start(primary, server_factory)  # still configured as primary
    with primary.client() as p, standby.client() as s:
        assert p.get("/v1/ha/status").json()["role"] == "standby"
        wait_for(
            lambda: caught_up(s, p) and views(p, before + after) == views(s, before + after),
            30,
            "the old primary to catch up",
        )
        assert p.get("/v1/ha/status").json()["epoch"] == 2
        r = p.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["echo"]})
        assert (r.status_code, r.json()["error"]["primary"]) == (409, standby.address)
        assert p.get("/v1/memory/blocks/after").content == b"new"


# ------------------------------------------------------------------------------ rotation


def segments(node: Node) -> list[int]:
    """First seq of each journal segment on disk."""
    return sorted(int(p.stem) for p in (node.data_dir / "ha" / "journal").glob("*.seg"))


def test_no_segment_is_released_before_every_peer_acked_it(
    tmp_path: Path, server_factory: Any
) -> None:
    primary, standby = make_pair(tmp_path, VRM_HA_JOURNAL_MAX="8KiB")
    start(standby, server_factory)
    start(primary, server_factory)
    with primary.client() as p, standby.client() as s:
        ids: list[str] = []
        for r in range(5):  # rotations while the live standby is acknowledging
            ids += submit_echo(p, 20, f"live{r}")
            assert p.post("/v1/ha/rotate").status_code == 200
        wait_for(lambda: ended(p, ids) and caught_up(p, s), 30, "replication")
        assert all_history(p) == all_history(s)
        assert p.get("/v1/ha/status").json()["snapshots_sent"] == 0  # never released too soon
    assert standby.server is not None
    standby.server.kill(signal.SIGKILL)
    with primary.client() as p:
        held_from = segments(primary)[0]
        acked = p.get("/v1/ha/status").json()["last_seq"]
        for r in range(4):
            ids += submit_echo(p, 50, f"down{r}")
            assert p.post("/v1/ha/rotate").status_code == 200
        wait_for(lambda: ended(p, ids), 60, "tasks to end")
        held = segments(primary)
        assert len(held) >= 5 and held[0] == held_from <= acked + 1
        status = p.get("/v1/ha/status").json()
        assert status["peers"][0]["state"] == "down"
        assert status["peers"][0]["acked_seq"] == acked
        assert status["peers"][0]["lag"] == status["last_seq"] - acked > 0

        def gauge_follows() -> bool:
            # The gauge is set each shipping round: read until one round has passed since the
            # last change (a delta may still be written just after the tasks ended).
            lag = metric_value(
                p.get("/metrics").text, "vramancer_ha_replication_lag_deltas", peer=standby.address
            )
            return bool(lag == p.get("/v1/ha/status").json()["last_seq"] - acked)

        wait_for(gauge_follows, 10, "the lag gauge")
    start(standby, server_factory)
    with primary.client() as p, standby.client() as s:
        wait_for(lambda: caught_up(p, s), 30, "the standby to catch up")
        wait_for(lambda: len(segments(primary)) <= 2, 10, "acked segments to be released")
        assert all_history(p) == all_history(s)


def test_turning_replication_on_ships_the_state_that_was_already_there(
    tmp_path: Path, server_factory: Any
) -> None:
    primary, standby = make_pair(tmp_path)
    plain = server_factory(CONFIG, data_dir=primary.data_dir, port=primary.port)
    with plain.client() as c:
        ids = submit_echo(c, 20, "old")
        wait_for(lambda: ended(c, ids), 30, "tasks to end")
        c.put("/v1/memory/blocks/old", content=b"kept", params={"durable": "true"})
    plain.stop()
    start(standby, server_factory)
    start(primary, server_factory)
    with primary.client() as p, standby.client() as s:

        def explain() -> None:
            a, b = views(p, ids), views(s, ids)
            for key in a:
                if a[key] != b[key]:
                    print("DIFF", key, a[key], b[key])
            print(p.get("/v1/ha/status").json(), s.get("/v1/ha/status").json())

        wait_for(
            lambda: caught_up(p, s) and views(p, ids) == views(s, ids),
            30,
            "the old state",
            explain,
        )
        assert s.get("/v1/memory/blocks/old").content == b"kept"
        assert len(all_history(s)) == 20


@pytest.mark.slow
def test_ten_thousand_mixed_changes_reach_the_standby(tmp_path: Path, server_factory: Any) -> None:
    primary, standby = make_pair(tmp_path)
    start(standby, server_factory)
    start(primary, server_factory)
    with primary.client() as p, standby.client() as s:
        ids: list[str] = []
        for r in range(20):  # 2000 tasks, each submitted, leased, running, done: 8000 changes
            ids += submit_echo(p, 100, f"big{r}")
            for b in range(50):  # 1000 puts, 200 deletes
                p.put(
                    f"/v1/memory/blocks/big{r}/{b}",
                    content=os.urandom(64),
                    params={"durable": "true"},
                )
            for b in range(0, 50, 5):
                p.delete(f"/v1/memory/blocks/big{r}/{b}")
        wait_for(lambda: ended(p, ids), 300, "tasks to end")
        wait_for(lambda: caught_up(p, s) and all_history(p) == all_history(s), 120, "replication")
        assert all_blocks(p) == all_blocks(s)
        assert len(all_blocks(s)) == 800


def test_peers_authenticate_by_signature_when_tokens_are_configured(
    tmp_path: Path, server_factory: Any
) -> None:
    config = CONFIG + '[auth]\ntokens = { "adm-token-0123456789" = "admin" }\n'
    primary, standby = make_pair(tmp_path, config=config)
    start(standby, server_factory)
    start(primary, server_factory)
    assert primary.server is not None and standby.server is not None
    with (
        primary.server.client("adm-token-0123456789") as p,
        standby.server.client("adm-token-0123456789") as s,
    ):
        assert p.put("/v1/memory/blocks/t", content=b"v", params={"durable": "true"}).is_success
        wait_for(lambda: s.get("/v1/memory/blocks/t").content == b"v", 20, "the block")
        assert p.get("/v1/ha/status").json()["peers"][0]["state"] == "up"
        with standby.server.client() as anonymous:
            assert anonymous.get("/v1/ha/status").status_code == 401
            assert anonymous.put("/v1/memory/blocks/u", content=b"x").status_code == 401


def test_a_replaced_primary_that_was_only_frozen_steps_down(
    tmp_path: Path, server_factory: Any
) -> None:
    primary, standby = make_pair(tmp_path)
    start(standby, server_factory)
    start(primary, server_factory)
    assert primary.server is not None
    with primary.client() as p, standby.client() as s:
        before = submit_echo(p, 5, "before")
        wait_for(lambda: ended(p, before) and caught_up(p, s), 30, "replication")
        os.killpg(primary.server.proc.pid, signal.SIGSTOP)  # a cut link, as the standby sees it
        try:
            assert s.post("/v1/ha/promote").json()["epoch"] == 2
            after = submit_echo(s, 5, "after")
            wait_for(lambda: ended(s, before + after), 30, "tasks on the new primary")
        finally:
            os.killpg(primary.server.proc.pid, signal.SIGCONT)
        wait_for(lambda: p.get("/v1/ha/status").json()["role"] == "standby", 20, "step down")
        wait_for(
            lambda: caught_up(s, p) and all_history(p) == all_history(s), 30, "the old primary"
        )
        assert p.get("/v1/ha/status").json()["epoch"] == 2
        r = p.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["echo"]})
        assert (r.status_code, r.json()["error"]["primary"]) == (409, standby.address)
        assert s.get("/v1/ha/status").json()["role"] == "primary"


def test_ram_blocks_and_hand_allocations_are_recorded_not_served(
    tmp_path: Path, server_factory: Any
) -> None:
    gpu = '[devices]\nbackends = []\n[[devices.simulated]]\nname = "sim0"\nmemory = "24GiB"\n'
    primary, standby = make_pair(tmp_path, config=CONFIG + gpu)
    start(standby, server_factory)
    start(primary, server_factory)
    with primary.client() as p, standby.client() as s:
        assert p.put("/v1/memory/blocks/ram", content=b"volatile").json()["tier"] != "L5"
        granted = p.post("/v1/allocations", json={"workload_type": "llm", "memory": "1GiB"})
        assert granted.status_code == 201, granted.text

        def replica() -> dict[str, int]:
            return dict(s.get("/v1/ha/status").json()["replica"])

        wait_for(
            lambda: replica() == {"blocks_without_data": 1, "allocations": 1}, 20, "the records"
        )
        assert s.get("/v1/memory/blocks/ram").status_code == 404  # RAM bytes never travel
        assert s.get("/v1/allocations").json()["allocations"] == []  # recorded, not granted
        assert p.delete(f"/v1/allocations/{granted.json()['id']}").status_code == 200
        assert p.delete("/v1/memory/blocks/ram").status_code == 200
        wait_for(
            lambda: replica() == {"blocks_without_data": 0, "allocations": 0}, 20, "the removals"
        )


def test_a_restarted_standby_keeps_the_primarys_running_tasks_running(
    tmp_path: Path, server_factory: Any
) -> None:
    primary, standby = make_pair(tmp_path)
    start(standby, server_factory)
    start(primary, server_factory)
    with primary.client() as p:
        task = p.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["sleep", "20"]}).json()
        params = {"task_id": task["task_id"]}
        with standby.client() as s:
            wait_for(
                lambda: s.get("/api/tasks/status", params=params).json()["state"] == "running",
                20,
                "the task to run",
            )
        assert standby.server is not None
        standby.server.kill(signal.SIGKILL)
        start(standby, server_factory)
        with standby.client() as s:
            shown = s.get("/api/tasks/status", params=params).json()
            assert shown == p.get("/api/tasks/status", params=params).json()
            assert shown["state"] == "running"
            assert s.get("/api/tasks/stats").json()["counts"]["running"] == 1
        assert p.post(f"/api/tasks/{task['task_id']}/cancel").status_code == 200
