"""PoolConnection against a real nats-server: a server down at start, a restart, token auth,
and the 503 while the server cannot be reached."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import RetentionPolicy, StorageType

from tests.natsserver import NatsServer
from tests.unit.pool.conftest import eventually, pool_settings
from vramancer.errors import ConfigError
from vramancer.pool.connection import DEAD_MAX_AGE_S, NatsUnavailable, PoolConnection
from vramancer.pool.kvbucket import DEFAULT_MAX_VALUE
from vramancer.pool.subjects import (
    DEAD_STREAM,
    NODES_BUCKET,
    POOL_BUCKET,
    TASKS_BUCKET,
    WORK_STREAM,
)

Connect = Callable[..., Any]


async def test_a_server_down_at_start_is_waited_for_then_the_infra_is_created(
    nats_server: NatsServer, connect: Connect
) -> None:
    nats_server.stop()
    conn = await connect()  # returns at once, no error
    assert conn.state == "disconnected" and not conn.connected
    await eventually(lambda: conn.last_error is not None, what="a connect failure recorded")
    assert "111" in (conn.last_error or "") or "refused" in (conn.last_error or "").lower()
    await asyncio.sleep(0.3)
    assert conn.state == "disconnected"

    nats_server.start()
    assert await conn.wait_ready(10)
    assert conn.state == "connected" and conn.last_error is None
    assert conn.server_version is not None and conn.server_version >= (2, 9, 0)
    assert conn.server_at_least(2, 9) and not conn.server_at_least(99, 0)

    work = await conn.js.stream_info(WORK_STREAM)
    assert work.config.subjects == ["vrm.work.>"]
    assert work.config.retention == RetentionPolicy.WORK_QUEUE
    assert work.config.storage == StorageType.FILE
    dead = await conn.js.stream_info(DEAD_STREAM)
    assert dead.config.subjects == ["vrm.dead.>"]
    assert dead.config.retention == RetentionPolicy.LIMITS
    assert dead.config.storage == StorageType.FILE
    assert dead.config.max_age == DEAD_MAX_AGE_S == 7 * 86400
    for bucket in (NODES_BUCKET, TASKS_BUCKET, POOL_BUCKET):
        status = await (await conn.js.key_value(bucket)).status()
        assert status.history == 1, bucket
        config = status.stream_info.config
        assert config.storage == StorageType.FILE and config.allow_direct
        assert config.max_msg_size == DEFAULT_MAX_VALUE

    # Idempotent, here and from a second node.
    await conn.ensure_infra()
    other = await connect(name="other")
    assert await other.wait_ready(10)
    assert (await conn.js.stream_info(WORK_STREAM)).state.messages == 0


async def test_a_restart_runs_the_callbacks_again_and_a_rewatch_sees_new_puts(
    nats_server: NatsServer, connect: Connect
) -> None:
    conn = await connect()
    seen: list[bytes] = []
    runs: list[int] = []
    followers: list[asyncio.Task[None]] = []

    async def watch() -> None:
        runs.append(len(runs) + 1)
        for task in followers:
            task.cancel()
        watcher = await (await conn.kv(POOL_BUCKET)).watchall()

        async def follow() -> None:
            async for entry in watcher:
                if entry is not None and entry.value:
                    seen.append(entry.value)

        followers.append(asyncio.create_task(follow()))

    conn.on_connect(watch)
    assert await conn.wait_ready(10)
    assert runs == [1]
    await (await conn.kv(POOL_BUCKET)).put("k", b"before")
    await eventually(lambda: b"before" in seen, what="the first put seen")

    nats_server.restart()
    await eventually(lambda: len(runs) == 2, timeout=10, what="the callback run again")
    assert await conn.wait_ready(10)
    await (await conn.kv(POOL_BUCKET)).put("k", b"after")
    await eventually(lambda: b"after" in seen, what="a put after the restart seen")
    for task in followers:
        task.cancel()


async def test_a_callback_registered_when_connected_runs_at_once(connect: Connect) -> None:
    conn = await connect()
    assert await conn.wait_ready(10)
    ran = asyncio.Event()

    async def late() -> None:
        ran.set()

    conn.on_connect(late)
    await asyncio.wait_for(ran.wait(), 5)
    assert await conn.wait_ready(5)


async def test_a_failing_callback_is_logged_retried_and_never_drops_the_connection(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await connect()
    calls: list[int] = []
    after: list[int] = []

    async def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("not yet")

    async def later() -> None:
        after.append(1)

    with caplog.at_level(logging.WARNING, logger="vramancer.pool.connection"):
        conn.on_connect(flaky)
        conn.on_connect(later)
        await eventually(lambda: len(calls) == 2, what="the failing callback tried again")
    assert conn.connected
    assert after == [1]  # the one after it ran once, not again for the retry
    assert any("not yet" in r.getMessage() for r in caplog.records)
    assert await conn.wait_ready(5)
    assert conn.last_error is None  # cleared once every callback has run


async def test_token_auth(nats_server: NatsServer, connect: Connect) -> None:
    nats_server.extra_args = ["--auth", "s3cret-token"]
    nats_server.restart()
    good = await connect(name="good", token="s3cret-token")
    assert await good.wait_ready(10)
    await (await good.kv(NODES_BUCKET)).put("x", b"1")

    wrong = await connect(name="wrong", token="not-the-token")
    await eventually(lambda: wrong.last_error is not None, what="the refusal recorded")
    await asyncio.sleep(0.3)
    assert wrong.state == "disconnected"
    assert "authorization" in (wrong.last_error or "").lower()
    with pytest.raises(NatsUnavailable, match=r"(?i)authorization"):
        _ = wrong.js


async def test_js_nc_and_kv_raise_503_while_disconnected(
    nats_server: NatsServer, connect: Connect
) -> None:
    conn = await connect()
    assert await conn.wait_ready(10)
    nats_server.stop()
    await eventually(lambda: conn.state == "disconnected", what="the loss noticed")
    for reach in (lambda: conn.js, lambda: conn.nc):
        with pytest.raises(NatsUnavailable) as caught:
            reach()
        assert caught.value.http_status == 503
        assert caught.value.code == "nats_unavailable"
        assert nats_server.url.removeprefix("nats://") in caught.value.message
    with pytest.raises(NatsUnavailable):
        await conn.kv(NODES_BUCKET)
    assert not await conn.wait_connected(0.2)


async def test_settings_that_cannot_work_are_refused_at_start(tmp_path: Path) -> None:
    url = "nats://127.0.0.1:1"
    cases = [
        ({"creds": tmp_path / "missing.creds"}, "nats.creds"),
        ({"nkey_seed": tmp_path / "missing.nk"}, "nats.nkey_seed"),
        ({"tls_cert": tmp_path / "c.pem"}, "nats.tls_key"),
        ({"tls_ca": tmp_path / "ca.pem"}, "nats.tls_ca"),
    ]
    for overrides, field in cases:
        conn = PoolConnection(pool_settings(url, **overrides), name="x")
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            await conn.start()
        await conn.stop()
    with pytest.raises(ConfigError, match=r"nats\.url"):
        await PoolConnection(pool_settings(url).model_copy(update={"url": None}), name="x").start()


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _certificates(where: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, signed by the CA."""
    files = {n: where / f"{n}.pem" for n in ("ca", "ca-key", "srv", "srv-key", "cli", "cli-key")}
    key = ["-newkey", "rsa:2048", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *key,
        "-subj",
        "/CN=vrm-ca",
        "-days",
        "2",
        "-keyout",
        files["ca-key"],
        "-out",
        files["ca"],
    )
    ext = where / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ca = ["-CA", files["ca"], "-CAkey", files["ca-key"], "-CAcreateserial"]
    for name in ("srv", "cli"):
        csr = where / f"{name}.csr"
        _openssl("req", *key, "-subj", f"/CN={name}", "-keyout", files[f"{name}-key"], "-out", csr)
        _openssl(
            "x509", "-req", "-in", csr, *ca, "-days", "2", "-extfile", ext, "-out", files[name]
        )
    return files


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make certificates")
async def test_tls_with_a_client_certificate(
    nats_server: NatsServer, connect: Connect, tmp_path: Path
) -> None:
    pem = _certificates(tmp_path)
    nats_server.extra_args = ["--tlsverify", "--tlscacert", str(pem["ca"])]
    nats_server.extra_args += ["--tlscert", str(pem["srv"]), "--tlskey", str(pem["srv-key"])]
    nats_server.restart()
    good = await connect(name="tls", tls_ca=pem["ca"], tls_cert=pem["cli"], tls_key=pem["cli-key"])
    assert await good.wait_ready(10)
    await (await good.kv(NODES_BUCKET)).put("x", b"1")

    # The system's CAs do not know this server's certificate.
    stranger = await connect(name="stranger", tls_cert=pem["cli"], tls_key=pem["cli-key"])
    await eventually(lambda: stranger.last_error is not None, what="the refusal recorded")
    assert not stranger.connected
    assert "certificate" in (stranger.last_error or "").lower()


async def test_nkey_seed(nats_server: NatsServer, connect: Connect, tmp_path: Path) -> None:
    nkeys = pytest.importorskip("nkeys", reason="the nkeys package (nats extra) is not installed")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    config = tmp_path / "nkey.conf"
    config.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    nats_server.extra_args = ["-c", str(config)]
    nats_server.restart()

    good = await connect(name="nkey", nkey_seed=seed_file)
    assert await good.wait_ready(10)
    anonymous = await connect(name="anonymous")
    await eventually(lambda: anonymous.last_error is not None, what="the refusal recorded")
    assert not anonymous.connected
    assert "authorization" in (anonymous.last_error or "").lower()
