"""A full disk met anywhere under a route is a JSON 507, whatever raised it; other I/O errors
are not dressed up as one."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from vramancer.api.app import create_app
from vramancer.config import Settings
from vramancer.runtime import Runtime


async def _submit_failing_with(
    settings: Settings, exc: BaseException, monkeypatch: pytest.MonkeyPatch
) -> httpx.Response:
    async with Runtime(settings) as rt:

        def fail(*args: Any, **kwargs: Any) -> Any:
            raise exc

        monkeypatch.setattr(rt.tasks, "submit", fail)
        transport = httpx.ASGITransport(app=create_app(runtime=rt), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            return await c.post("/api/tasks/submit", json={"type": "noop"})


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        sqlite3.OperationalError("database or disk is full"),
    ],
)
async def test_a_full_disk_under_any_route_is_a_json_507(
    settings_factory: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
) -> None:
    r = await _submit_failing_with(settings_factory(), exc, monkeypatch)
    assert r.status_code == 507, r.text
    assert r.json()["error"]["code"] == "insufficient_storage"
    assert "Nothing was changed" in r.json()["error"]["message"]


async def test_other_io_errors_are_not_reported_as_a_full_disk(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    r = await _submit_failing_with(
        settings_factory(), OSError(errno.EIO, "Input/output error"), monkeypatch
    )
    assert r.status_code == 500
    assert "insufficient_storage" not in r.text
