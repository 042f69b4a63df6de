"""A schemathesis run over the live server's OpenAPI schema: no request may get a 5xx, and
every answer must match the schema its route declares (``response_schema_conformance``: the
response models of ``api/schemas.py``, and the error object of every 4xx).

Every router is covered (whatever exists when this runs). The server has no tokens (loopback,
every caller admin, so every route is reachable), rate limiting off, one simulated GPU, and
command tasks restricted to ``true`` so generated task bodies cannot run anything else.
Examples per operation are bounded so the run stays well under a minute here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = """
[devices]
backends = []
[[devices.simulated]]
name = "sim0"
memory = "24GiB"

[tasks]
allowed_commands = ["true"]
"""
#: Endpoints that stream forever (server-sent events): a fuzzer cannot wait for their end.
STREAMING = ("/v1/events",)
MAX_EXAMPLES = int(os.environ.get("VRAMANCER_TEST_SCHEMATHESIS_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with running_server(tmp, CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"}) as proc:
        yield proc


def test_no_operation_answers_5xx_or_off_schema(server: ServerProcess, tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")
    cmd = [
        str(st) if st.exists() else "st",
        "run",
        f"{server.url}/openapi.json",
        "--checks", "not_a_server_error,response_schema_conformance",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "20261127",
        "--workers", "1",
        "--request-timeout", "20",
        "--suppress-health-check", "all",
        "--warnings", "off",
        "--report", "junit",
        "--report-dir", str(tmp_path),
    ]  # fmt: skip
    for path in STREAMING:
        cmd += ["--exclude-path", path]
    # cwd: schemathesis keeps a crash cache in ./.schemathesis; keep it out of the checkout
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=tmp_path)
    server_log = ""
    if proc.returncode != 0:
        server.kill()
        server_log = server.proc.stdout.read().decode()[-4000:] if server.proc.stdout else ""
    assert proc.returncode == 0, f"{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}\n{server_log}"
    (report,) = tmp_path.glob("junit-*.xml")
    suite = ET.parse(report).getroot()
    assert (suite.get("failures"), suite.get("errors")) == ("0", "0")
    tested = {case.get("name") for case in suite.iter("testcase")}
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    expected = {
        f"{method.upper()} {path}"
        for path, item in schema["paths"].items()
        if path not in STREAMING
        for method in item
    }
    assert tested == expected  # every operation was exercised
    assert {"GET /v1/system/resources", "POST /v1/models/can-load", "GET /v1/devices"} <= tested
