"""deploy/grafana/vramancer.json: every metric a panel (or a dashboard variable) queries is one
a real ``vramancer serve`` exports on ``/metrics``. The pool's metrics exist only on a pool's
orchestrator (``[nats] url``) and the HA ones only with replication configured; those are
checked against the names ``pool/metrics.py`` and ``replication/*.py`` register instead."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerProcess, running_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "vramancer.json"
#: Sources of the metrics a plain ``vramancer serve`` does not export, by name prefix.
REGISTERED_ELSEWHERE = {
    "vramancer_pool_": [ROOT / "src" / "vramancer" / "pool" / "metrics.py"],
    "vramancer_ha_": sorted((ROOT / "src" / "vramancer" / "replication").glob("*.py")),
}
CONFIG = """
[devices]
backends = []

[[devices.simulated]]
name = "sim0"
memory = "24GiB"
used = "6GiB"

[[models]]
name = "sleeper"
backend = "process"
command = ["sleep", "600"]
health_url = "http://127.0.0.1:9/health"
vram = "1GiB"
"""
_METRIC = re.compile(r"\bvramancer_[a-z0-9_]+")
#: Samples of a histogram named after its family.
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
#: Panels the dashboard must have: (title words, a metric one of its queries reads).
REQUIRED = [
    ("GPU memory", "vramancer_gpu_memory_used_bytes"),
    ("GPU memory", "vramancer_gpu_memory_total_bytes"),
    ("Reservations", "vramancer_arbiter_allocated_bytes"),
    ("Tasks by state", "vramancer_tasks_running"),
    ("Queue depth", "vramancer_tasks_queue_depth"),
    ("Memory tiers", "vramancer_memory_tier_used_bytes"),
    ("Models loaded", "vramancer_model_state"),
    ("Pool nodes", "vramancer_pool_node_up"),
    ("HA replication", "vramancer_ha_journal_size_bytes"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("grafana"), CONFIG) as proc:
        yield proc


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panel_queries() -> dict[str, list[str]]:
    """Each panel's title and the expressions of its queries."""
    out: dict[str, list[str]] = {}
    for panel in dashboard()["panels"]:
        out[panel["title"]] = [t["expr"] for t in panel.get("targets", [])]
    return out


def variable_queries() -> list[str]:
    return [v["definition"] for v in dashboard()["templating"]["list"] if v.get("type") == "query"]


def live_names(text: str) -> set[str]:
    """Metric names on a /metrics page: families (``# TYPE``) and sample names."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def family(name: str, families: set[str]) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in families:
            return name.removesuffix(suffix)
    return name


def registered_elsewhere(name: str) -> bool:
    """A pool or HA metric that the code registers (by its name in the registering module)."""
    for prefix, sources in REGISTERED_ELSEWHERE.items():
        if name.startswith(prefix):
            return any(f'"{name}"' in path.read_text() for path in sources)
    return False


def test_the_dashboard_has_the_panels_asked_for() -> None:
    queries = panel_queries()
    for words, metric in REQUIRED:
        matching = [t for t in queries if words.lower() in t.lower()]
        assert matching, words
        assert any(metric in e for t in matching for e in queries[t]), (words, metric)
    for title, exprs in queries.items():
        assert exprs, title
        for expr in exprs:
            assert _METRIC.search(expr), (title, expr)


def test_every_queried_metric_is_exported(server: ServerProcess) -> None:
    with server.client() as client:
        page = client.get("/metrics")
    assert page.status_code == 200
    live = live_names(page.text)
    assert registered_elsewhere("vramancer_pool_node_up")  # the sources are found
    assert registered_elsewhere("vramancer_ha_journal_size_bytes")
    assert not registered_elsewhere("vramancer_pool_node_upp")
    queried: dict[str, set[str]] = {}
    for title, exprs in {**panel_queries(), "variables": variable_queries()}.items():
        for expr in exprs:
            for name in _METRIC.findall(expr):
                queried.setdefault(family(name, live), set()).add(title)
    missing = {
        name: titles
        for name, titles in queried.items()
        if name not in live and not registered_elsewhere(name)
    }
    assert missing == {}
    # The simulated GPU and the configured model have samples, not only a family line.
    assert 'vramancer_gpu_memory_used_bytes{backend="simulated"' in page.text
    assert 'model="sleeper"' in page.text
