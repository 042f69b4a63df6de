"""Headless chromium for the page tests: the DOM a real browser builds after running a page's
scripts (``--dump-dom``), skipped where no chromium is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def chromium() -> str | None:
    """The chromium to run, or None on a machine without one."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(url: str, profile: Path, *, budget_ms: int = 4000, extra: tuple[str, ...] = ()) -> str:
    """The DOM of ``url`` after ``budget_ms`` of virtual time (``extra``: more flags)."""
    binary = chromium()
    assert binary is not None, "no headless chromium on this machine"
    argv = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        *extra,
        f"--user-data-dir={profile}",
        "--dump-dom",
        f"--virtual-time-budget={budget_ms}",
        url,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, check=True).stdout
