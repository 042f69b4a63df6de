"""Shared fixtures. Integration fixtures start real processes and always clean them up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerProcess, has_nvidia_gpu, start_server
from tests.natsserver import nats_server  # noqa: F401  (a fixture for the pool tests)
from vramancer.config import Settings


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where an NVIDIA GPU answers."""
    if has_nvidia_gpu():
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    """Settings with a private data directory; keyword arguments override sections."""

    def make(**overrides: Any) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "data")
        overrides.setdefault("disable_rate_limit", True)
        return Settings(**overrides)

    return make


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real ``vramancer serve`` processes on free ports; all are killed at teardown."""
    started: list[ServerProcess] = []

    def make(config_text: str = "", **kwargs: Any) -> ServerProcess:
        server = start_server(tmp_path, config_text, **kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.kill()
        if server.proc.stdout:
            server.proc.stdout.close()
