"""``vramancer serve`` as a real process on a free port, talked to over TCP.

Auth and roles, rate limiting, error bodies, the separate metrics port, the refusal to listen on
a public address without tokens, and the CLI (``status``, ``can-load``, ``optimize``) against
the running server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, free_port, running_server, wait_http
from tests.promtext import metric_value

pytestmark = pytest.mark.integration

GIB = 1024**3
TOKENS = {"adm": "admin", "op": "operator", "view": "viewer", "burst": "viewer"}
CONFIG = """
[server]
rate_limit_burst = 20
rate_limit_per_s = 0.5

[auth]
tokens = { "adm" = "admin", "op" = "operator", "view" = "viewer", "burst" = "viewer" }

[devices]
backends = []
poll_interval_s = 0.2

[[devices.simulated]]
name = "sim0"
memory = "24GiB"
used = "4GiB"
"""


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, metrics_port: int) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("serve")
    with running_server(tmp, CONFIG, env={"VRM_METRICS_PORT": str(metrics_port)}) as proc:
        yield proc


def get(server: ServerProcess, path: str, token: str | None = None, **kw: object) -> httpx.Response:
    with server.client(token) as client:
        return client.get(path, **kw)  # type: ignore[arg-type]


def test_healthz_is_open_and_everything_else_needs_a_token(server: ServerProcess) -> None:
    health = get(server, "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for path in ("/v1/devices", "/v1/system/resources", "/metrics"):
        response = get(server, path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
    unknown = get(server, "/v1/devices", token="nope")
    assert unknown.status_code == 401 and unknown.json()["error"]["message"] == "unknown token"
    assert get(server, "/v1/devices", token="view").status_code == 200


def test_roles_and_x_api_role(server: ServerProcess) -> None:
    with server.client("view") as viewer, server.client("adm") as admin, server.client("op") as op:
        low = viewer.post("/v1/system/optimize")
        assert low.status_code == 403
        assert low.json()["error"]["message"] == (
            "this needs the operator role; the caller has viewer"
        )
        assert (
            viewer.post("/v1/system/optimize", headers={"X-API-ROLE": "admin"}).status_code == 403
        )
        assert (
            admin.post("/v1/system/optimize", headers={"X-API-ROLE": "viewer"}).status_code == 403
        )
        ok = op.post("/v1/system/optimize")
        assert ok.status_code == 200 and "actions_taken" in ok.json()


def test_bad_input_gets_a_json_4xx_and_changes_nothing(server: ServerProcess) -> None:
    with server.client("op") as client:
        before = client.get("/v1/system/resources").json()["gpus"]
        cases = [
            client.post("/v1/models/can-load", json={"model_id": "m", "estimated_size_mb": -1}),
            client.post("/v1/models/can-load", content=b"not json",
                        headers={"content-type": "application/json"}),
            client.get("/v1/models/recommend", params={"model_id": "m", "params": "many"}),
            client.get("/v1/devices/abc"),
        ]  # fmt: skip
        for response in cases:
            assert 400 <= response.status_code < 500
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["error"]["message"]
        assert client.get("/v1/nowhere").json()["error"]["code"] == "not_found"
        after = client.get("/v1/system/resources").json()["gpus"]
        assert [g["memory_used_bytes"] for g in after] == [g["memory_used_bytes"] for g in before]


def test_can_load_and_resources_over_tcp(server: ServerProcess) -> None:
    with server.client("view") as client:
        yes = client.post("/v1/models/can-load", json={"model_id": "m", "estimated_size_mb": 8000})
        assert yes.json()["can_load"] is True and yes.json()["device"] == "gpu:0"
        gpus = client.get("/v1/system/resources").json()["gpus"]
        assert gpus[0]["memory_used_bytes"] == 4 * GIB and gpus[0]["simulated"] is True


def test_rate_limit_429_with_retry_after(server: ServerProcess) -> None:
    with server.client("burst") as client:
        codes = [client.get("/v1/devices").status_code for _ in range(30)]
        assert codes[:20] == [200] * 20
        assert 429 in codes[20:]
        limited = client.get("/v1/devices")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limited"
    assert get(server, "/v1/devices", token="view").status_code == 200  # other clients unaffected


def test_metrics_on_the_separate_port(server: ServerProcess, metrics_port: int) -> None:
    response = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
    assert response.status_code == 200
    labels = {"backend": "simulated", "device": "sim-sim0"}
    assert metric_value(response.text, "vramancer_gpu_memory_used_bytes", **labels) == 4 * GIB
    assert metric_value(response.text, "vramancer_host_memory_available_bytes", device="host")
    assert metric_value(response.text, "vramancer_device_poll_duration_seconds_count")


def cli(
    server: ServerProcess, token: str, *args: str, url: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    env.update({"VRM_URL": url or server.url, "VRM_API_TOKEN": token, "COLUMNS": "200"})
    return subprocess.run(
        [sys.executable, "-m", "vramancer.main", "--mode", "cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_against_the_server(server: ServerProcess) -> None:
    status = cli(server, "view", "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["source"] == "server"
    assert [d["uuid"] for d in data["devices"]] == ["sim-sim0"]
    fits = cli(server, "view", "can-load", "m", "--size-mb", "900000000", "--json")
    assert fits.returncode == 3 and json.loads(fits.stdout)["can_load"] is False
    denied = cli(server, "view", "optimize")
    assert denied.returncode == 1 and "operator role" in denied.stderr
    allowed = cli(server, "op", "optimize", "--json")
    assert allowed.returncode == 0 and "actions_taken" in json.loads(allowed.stdout)
    bad_token = cli(server, "wrong", "status")
    assert bad_token.returncode == 1
    assert "unknown token; check VRM_API_TOKEN (HTTP 401)" in bad_token.stderr
    no_token = cli(server, "", "status")
    assert no_token.returncode == 1
    assert "a bearer token is required; set VRM_API_TOKEN (HTTP 401)" in no_token.stderr
    wrong_url = cli(server, "view", "status", url=server.url + "/v1")
    assert wrong_url.returncode == 1
    assert f"GET {server.url}/v1/v1/devices; is VRM_URL right?" in wrong_url.stderr


def test_without_tokens_loopback_callers_are_admin(
    server_factory: Callable[..., ServerProcess],
) -> None:
    open_server = server_factory("[devices]\nbackends = []\n")
    with open_server.client() as client:
        assert client.post("/v1/system/optimize").status_code == 200
        assert client.get("/v1/devices").json()["cpu_only"] is True


def test_refuses_a_public_address_without_tokens(tmp_path: Path) -> None:
    config = tmp_path / "empty.toml"
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    env["VRM_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, "-m", "vramancer.main", "--mode", "serve", "--host", "0.0.0.0",
         "--port", str(free_port()), "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0: no API tokens are configured" in proc.stderr
    assert "Add tokens under [auth] tokens in the config file" in proc.stderr  # not eaten as markup


def _serve_json(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    env["VRM_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.Popen(
        [sys.executable, "-m", "vramancer.main", "--mode", "serve", "--json",
         "--port", str(port), "--config", str(tmp_path / "serve.toml")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def test_serve_json_logs_one_object_per_line(tmp_path: Path) -> None:
    port = free_port()
    missing = _serve_json(tmp_path, port)
    out = missing.communicate(timeout=60)[0]
    assert missing.returncode == 2 and b"config file not found" in out  # a plain error, exit 2
    (tmp_path / "serve.toml").write_text("[devices]\nbackends = []\n")
    proc = _serve_json(tmp_path, port)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        httpx.get(f"http://127.0.0.1:{port}/v1/devices", timeout=10)
        httpx.get(f"http://127.0.0.1:{port}/v1/nothing-here", timeout=10)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        text = proc.communicate(timeout=30)[0].decode()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    loggers = {line["logger"] for line in lines}
    assert "vramancer.devices.manager" in loggers and "uvicorn.error" in loggers
    # The access log too, its failed requests only (no --access-log)
    assert any("GET /v1/nothing-here" in line["message"] for line in lines)
    assert not any("GET /v1/devices" in line["message"] for line in lines)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
