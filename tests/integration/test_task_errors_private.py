"""A task's error is shown to every caller and streamed with its events, so it never quotes
the task's command: through a real ``vramancer serve``, another principal sees neither the
program nor its arguments of an operator's task that could not start, in status or on SSE."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import running_server
from tests.integration.test_tasks_hardening import wait_state

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = { "op" = "operator", "view" = "viewer" }
[devices]
backends = []
"""
SECRET = "secret-deploy-key-ABC123"


def test_a_failed_start_shows_no_command_text_to_other_callers(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"}) as server,
        server.client("op") as op,
        server.client("view") as view,
    ):
        body = {"type": "cmd", "cmd": [f"/opt/{SECRET}", "--password=hunter2"], "max_retries": 0}
        task_id = op.post("/api/tasks/submit", json=body).json()["task_id"]
        owner_view = wait_state(op, task_id)
        assert owner_view["state"] == "failed"
        assert owner_view["error"] == (
            "cannot start the program: No such file or directory; not retried"
        )
        status = view.get("/api/tasks/status", params={"task_id": task_id}).text
        history = view.get("/api/tasks/history").text
        for seen in (status, history):
            assert SECRET not in seen and "hunter2" not in seen
        # the event stream: what it replays of this task, read until its end event
        with view.stream("GET", "/v1/events", params={"replay": 100, "kinds": "task_*"}) as s:
            text = ""
            for chunk in s.iter_text():
                text += chunk
                if '"state":"failed"' in text.replace(" ", ""):
                    break
        assert task_id in text
        assert SECRET not in text and "hunter2" not in text
