"""A/B of one benchmark between two checkouts of VRAMancer: the same command, alternated.

``python -m bench.ab --before DIR --after DIR --rounds 3 -- bench.tasks.spawn --n 300 --json``
runs ``python -m bench.tasks.spawn --n 300 --json`` in each checkout (its own ``src`` first on
``PYTHONPATH``, its own ``bench`` package), ``before`` then ``after`` in round 1, ``after`` then
``before`` in round 2, and so on, so machine load falls on both sides alike. The benchmark must
print one JSON object; every numeric field is reported as the median over the rounds for each
side, with the after / before ratio. Use it to show a refactoring kept a benchmark's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_once(tree: Path, command: list[str], timeout_s: float) -> dict[str, Any]:
    """One run of ``python -m COMMAND`` in ``tree``; its JSON answer."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    start = done.stdout.find("{")
    if start < 0:
        raise SystemExit(f"{tree}: {' '.join(command)} printed no JSON object")
    answer: dict[str, Any] = json.loads(done.stdout[start:])
    return answer


def numbers(answer: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric fields, nested ones named by their path (``operations.load.manager_ms``);
    booleans and lists left out."""
    found: dict[str, float] = {}
    for key, value in answer.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found |= numbers(value, f"{name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found[name] = float(value)
    return found


def ab(
    before: Path, after: Path, command: list[str], rounds: int, timeout_s: float
) -> dict[str, Any]:
    """Alternate the two sides ``rounds`` times; medians per field and side."""
    seen: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(rounds):
        order = [("before", before), ("after", after)]
        for side, tree in order if i % 2 == 0 else order[::-1]:
            seen[side].append(numbers(run_once(tree, command, timeout_s)))
    fields = sorted(set(seen["before"][0]) & set(seen["after"][0]))
    result: dict[str, Any] = {"command": " ".join(command), "rounds": rounds, "fields": {}}
    for name in fields:
        b = statistics.median(run[name] for run in seen["before"])
        a = statistics.median(run[name] for run in seen["after"])
        result["fields"][name] = {
            "before": round(b, 4),
            "after": round(a, 4),
            "after_over_before": round(a / b, 3) if b else None,
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the older checkout")
    parser.add_argument("--after", type=Path, default=Path.cwd(), help="the newer checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- MODULE ARGS...")
    args = parser.parse_args(argv)
    command = [c for c in args.command if c != "--"] if args.command else []
    if not command:
        parser.error("give the benchmark after --: -- bench.tasks.spawn --n 300 --json")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    result = ab(args.before.resolve(), args.after.resolve(), command, args.rounds, args.timeout_s)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
