"""OpenTelemetry spans, on when ``VRM_TRACING=1``; a no-op otherwise (and without the extra).

Exporter: OTLP when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is
set, else the console. Library code calls :func:`span` and never imports opentelemetry itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_tracer: Any = None


def configure(enabled: bool, service_name: str = "vramancer") -> bool:
    """Install a tracer provider once; returns whether spans are now recorded."""
    global _tracer
    if not enabled:
        _tracer = None
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning(
            "VRM_TRACING=1 but opentelemetry-sdk is not installed: pip install 'vramancer[otel]'"
        )
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter: Any
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        except ImportError:
            log.warning(
                "OTLP endpoint set but the OTLP exporter is not installed (pip install "
                "'vramancer[otel]'); spans go to the console"
            )
            exporter = ConsoleSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("vramancer")
    return True


def enabled() -> bool:
    return _tracer is not None


def flush(timeout_s: float = 5.0) -> bool:
    """Export the spans still queued (``Runtime.stop()`` calls it, so a stopping daemon loses
    none); True when there was nothing to do or everything went out in time."""
    if _tracer is None:
        return True
    from opentelemetry import trace

    force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    return bool(force_flush(int(timeout_s * 1000))) if force_flush is not None else True


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span named ``name`` (e.g. ``memory.promote``) when tracing is on, else nothing."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name) as current:
        for key, value in attributes.items():
            if value is not None:
                current.set_attribute(key, value)
        yield current
