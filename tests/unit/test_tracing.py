"""``VRM_TRACING=1``: spans from the library reach the console exporter, or an OTLP collector
when the standard OTEL variables name one. Each case runs in its own process (OpenTelemetry's
tracer provider can be set once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from vramancer.observability import tracing

#: A runtime with tracing on runs one optimize (span ``resources.optimize``) and stops.
SCRIPT = """
import asyncio
from vramancer import Runtime, Settings

async def main():
    settings = Settings.load(devices={"backends": []})
    async with Runtime(settings) as rt:
        await rt.resources.optimize_resources()

asyncio.run(main())
"""


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VRM_", "OTEL_"))}
    clean |= {"VRM_TRACING": "1", "VRM_DATA_DIR": str(tmp_path / "data"), **env}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=clean, capture_output=True, text=True, timeout=90
    )


def test_tracing_off_is_a_no_op() -> None:
    assert tracing.configure(False) is False and not tracing.enabled()
    with tracing.span("anything", key="value") as current:
        assert current is None
    assert tracing.flush() is True


def test_console_exporter_prints_the_library_spans(tmp_path: Path) -> None:
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The console exporter prints one JSON object per span; the runtime's stop flushed them.
    names = [json.loads(chunk)["name"] for chunk in _json_objects(proc.stdout)]
    assert "resources.optimize" in names, proc.stdout[-2000:]


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.received.append((self.path, self.headers.get("content-type", ""), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: ClassVar[list[tuple[str, str, bytes]]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_otlp_endpoint_sends_the_spans_to_the_collector(
    tmp_path: Path, collector: tuple[str, list[tuple[str, str, bytes]]]
) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    url, received = collector
    proc = _run(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=url)
    assert proc.returncode == 0, proc.stderr
    assert '"name"' not in proc.stdout  # not the console exporter
    traces = [(ctype, body) for path, ctype, body in received if path == "/v1/traces"]
    assert traces, received
    assert all(ctype == "application/x-protobuf" for ctype, _ in traces)
    assert any(b"resources.optimize" in body for _, body in traces)


def _json_objects(text: str) -> Iterator[str]:
    """The top-level ``{...}`` objects in the console exporter's output."""
    depth, start = 0, 0
    for i, char in enumerate(text):
        if char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                yield text[start : i + 1]
