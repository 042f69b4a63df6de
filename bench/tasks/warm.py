"""Warm Python runner against a cold start: tasks that import torch and return.

``python -m bench.tasks.warm [--n 20] [--runs 5] [--kind python|cmd] [--json]``

Both sides run the same task, ``bench.tasks.torch_task:uses_torch`` (``import torch``, one small
tensor op on the CPU, return), one at a time through a fresh ``Runtime`` (real SQLite queue,
CPU-only host): cold with ``[tasks] warm_python = false`` (an interpreter per task, which imports
torch each time), warm with ``warm_python = true`` and ``warm_preload = ["torch"]`` (each task
forks from the runner that imported torch once; the runner's own start is not timed, as a
daemon starts it with itself). Runs alternate cold, warm, cold ...; per side the median of the
per-run medians of submit -> done for one task, and the median run's tasks per second.

``--kind cmd``: the same work as a program, ``bench/tasks/torch_script.py``, in a ``cmd`` task:
cold, ``[sys.executable, SCRIPT]`` (the interpreter a warm task runs in, started per task); warm,
``["python", SCRIPT]`` with ``"warm": true`` (forked from the runner).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.tasks.compare_redis import REPO_ROOT
from vramancer import Runtime, Settings

TASK = {"type": "python", "python": "bench.tasks.torch_task:uses_torch", "cwd": str(REPO_ROOT)}
SCRIPT = str(REPO_ROOT / "bench" / "tasks" / "torch_script.py")


def task(kind: str, warm: bool) -> dict[str, Any]:
    """The task body of one side."""
    if kind == "python":
        return TASK
    if warm:
        return {"type": "cmd", "cmd": ["python", SCRIPT], "cwd": str(REPO_ROOT), "warm": True}
    return {"type": "cmd", "cmd": [sys.executable, SCRIPT], "cwd": str(REPO_ROOT)}


async def _run(n: int, warm: bool, data_dir: Path, kind: str = "python") -> list[float]:
    body = task(kind, warm)
    tasks: dict[str, Any] = {"warm_python": warm, "warm_preload": ["torch"] if warm else []}
    async with Runtime(Settings(data_dir=data_dir, tasks=tasks)) as rt:
        if warm and rt.tasks.workers.warm is not None:
            await rt.tasks.workers.warm.start()  # the daemon starts it with itself
        first = await rt.tasks.submit(body)  # untimed: the first spawn of this runtime
        await rt.tasks.wait([first.task_id], timeout_s=300)
        seconds: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            sub = await rt.tasks.submit(body)
            await rt.tasks.wait([sub.task_id], timeout_s=300)
            seconds.append(time.perf_counter() - t0)
            record = await rt.tasks.status(sub.task_id)
            if record.stdout_tail.strip() != "45.0":
                raise RuntimeError(f"task output {record.stdout_tail!r}: {record.stderr_tail}")
    return seconds


def measure(n: int, runs: int, kind: str = "python") -> dict[str, Any]:
    sides: dict[str, list[list[float]]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="vrm-bench-warm-") as tmp:
        for i in range(runs):
            for side in ("cold", "warm"):
                data_dir = Path(tmp) / f"{side}-{i}"
                sides[side].append(asyncio.run(_run(n, side == "warm", data_dir, kind)))
    result: dict[str, Any] = {
        "n": n,
        "runs": runs,
        "kind": kind,
        "python": platform.python_version(),
    }
    for side, all_runs in sides.items():
        medians = [statistics.median(r) for r in all_runs]
        result[side] = {
            "submit_to_done_ms_median": round(statistics.median(medians) * 1000, 1),
            "per_run_median_ms": [round(m * 1000, 1) for m in medians],
            "tasks_per_s_median": round(n / statistics.median(sum(r) for r in all_runs), 1),
        }
    result["speedup"] = round(
        result["cold"]["submit_to_done_ms_median"] / result["warm"]["submit_to_done_ms_median"], 1
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20, help="tasks per run and side")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--kind", choices=["python", "cmd"], default="python", help="a python or a cmd task"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.n, args.runs, args.kind)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"import torch + return ({args.kind} task), one task at a time: cold "
        f"{result['cold']['submit_to_done_ms_median']} ms, warm "
        f"{result['warm']['submit_to_done_ms_median']} ms -> {result['speedup']}x"
    )


if __name__ == "__main__":
    main()
