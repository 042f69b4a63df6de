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
        return "loading on gpu:0"

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


def test_one_line_per_operation_says_what_happened() -> None:
    sim = {"name": "clip", "device": "gpu:0", "simulated": True, "runs_on": "cpu"}
    assert (
        models_cmds._describe(sim, "loaded", 1.234)
        == "clip: loaded on gpu:0 (simulated, runs on cpu) in 1.23 s"
    )
    assert (
        models_cmds._describe(sim, "moved", 0.02)
        == "clip: moved to gpu:0 (simulated, runs on cpu) in 0.02 s"
    )
    cpu = {"name": "clip", "device": "cpu", "simulated": False, "runs_on": "cpu"}
    assert models_cmds._describe(cpu, "loaded", 0.5) == "clip: loaded on cpu in 0.50 s"
    gone = {"name": "clip", "device": None, "simulated": False, "runs_on": None}
    assert models_cmds._describe(gone, "unloaded", 0.1) == "clip: unloaded in 0.10 s"


def test_a_switch_with_nothing_to_do_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    models_cmds._render_switch(
        {"name": "recording", "ok": True, "duration_s": 0.0, "steps": [], "notes": []}
    )
    out = capsys.readouterr().out
    assert "every model is already where recording wants it" in out
    assert "step" not in out  # no empty table
