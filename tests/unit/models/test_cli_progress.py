"""The CLI's progress display for long model operations (terminal path)."""

from __future__ import annotations

import time

import pytest
import typer

from vramancer.cli import models_cmds


class Tty:
    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


def test_progress_polls_the_state_while_the_request_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_cmds.sys, "stdout", Tty())
    monkeypatch.setattr(models_cmds, "POLL_S", 0.01)
    polls: list[float] = []

    def slow() -> dict[str, str]:
        time.sleep(0.15)
        return {"state": "loaded"}

    def poll() -> str:
        polls.append(time.monotonic())
        return "loading on cuda:0"

    assert models_cmds._with_progress("loading x", slow, False, poll) == {"state": "loaded"}
    assert len(polls) >= 3


def test_progress_passes_errors_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_cmds.sys, "stdout", Tty())

    def fails() -> None:
        raise typer.Exit(1)

    with pytest.raises(typer.Exit):
        models_cmds._with_progress("loading x", fails, False)


def test_json_output_skips_the_spinner() -> None:
    assert models_cmds._with_progress("x", lambda: 42, True) == 42
