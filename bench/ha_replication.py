"""What HA replication costs a primary, and how far a live standby trails it.

``python -m bench.ha_replication [--rounds 5] [--calls 200] [--batch 10] [--rates 1000,500]
[--seconds 12] [--dir DIR] [--json]``

Real ``vramancer serve`` processes (started as ``tests.helpers.start_server`` does), all with
the same configuration: the ``[tasks]`` defaults (``synchronous = "full"``: the SQLite commit
holding a submission is fsync'd before it is answered, and so is each batch of deltas the HA
capture journals), the ``[ha]`` defaults, and ``noop`` tasks kept queued:
``maintenance_idle_s`` of an hour, ``maintenance_max_wait_s = 0`` and ``auto_maintenance =
false``, so the dispatcher never runs them and every submission makes exactly one change (one
delta: the new task row). What is timed is submission, not execution. Data directories go
under ``--dir`` (default: the current directory, not ``/tmp``, which may be a tmpfs).

1. **Submit throughput.** The same work, ``--calls`` sequential ``POST /api/tasks/submit_batch``
   of ``--batch`` noop tasks each (after a warm-up), against three setups running side by side:
   ``plain`` (HA off), ``async`` (a primary with ``VRM_HA_REPLICATION=1`` and a live standby)
   and ``sync`` (the same with ``VRM_HA_SYNC=1``: a write is answered once the standby
   acknowledged it). The setups take turns, their order rotated (and reversed every other
   round); medians over ``--rounds`` rounds of the tasks acknowledged per second and of the
   per-round median and p99 latency of one call, with ratios to ``plain``.
2. **Lag under a steady load.** The async pair only (the other setups are stopped first): for
   each rate of ``--rates``, noop submissions paced at that many tasks per second (one
   ``submit_batch`` of ``rate / 50`` tasks every 20 ms, on a fixed schedule) for
   ``--seconds``. Every 50 ms the primary's ``GET /v1/ha/status`` gives ``last_seq -
   peers[0].acked_seq``: the deltas journaled that the standby has not acknowledged
   (``unacked``; the standby acknowledges a whole shipped batch once it applied it), and,
   since each submission is one delta, the tasks answered to the client whose delta is not
   journaled yet (``unjournaled``: the capture's backlog). Also every 50 ms, the latest
   submitted task joins a queue of probes; the standby is asked for the oldest one
   (``GET /api/tasks/status``) every 10 ms until it answers, giving the time from the
   primary's answer until the standby knows the task (``visible_on_standby_ms``, within
   10 ms): the whole path, capture, journal fsync, shipping, verification, apply. Deltas are
   applied in order, so probes are taken at a steady pace whatever the lag.
   ``unacked_deltas_p50_halves`` (median of the first and of the second half of the load)
   tells a steady lag from a growing one; ``standby_caught_up_after_s`` is the time from the
   last answer until the standby knows the last task.

The load average (``os.getloadavg()``) before, between the parts and after is reported: the
machine may be shared.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tests.helpers import ServerProcess, free_port, start_server

SECRET = "bench-secret-of-at-least-32-bytes-0123456789"
CONFIG = """
[tasks]
maintenance_idle_s = 3600
maintenance_max_wait_s = 0
auto_maintenance = false
"""
SETUPS = ("plain", "async", "sync")
#: Warm-up calls per setup before the first round.
WARMUP_CALLS = 20
#: Seconds between two lag samples, and between two paced submissions.
SAMPLE_S = 0.05
PACE_S = 0.02
#: How often a probe asks the standby whether it holds the task yet.
PROBE_POLL_S = 0.01


@dataclass
class Setup:
    """One setup of part 1: the node written to and, with HA, its standby."""

    name: str
    primary: ServerProcess
    standby: ServerProcess | None = None
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.primary.url, timeout=30.0)

    def stop(self) -> None:
        self.client.close()
        for server in (self.primary, self.standby):
            if server is not None:
                stop_server(server)


def stop_server(server: ServerProcess) -> None:
    with contextlib.suppress(Exception):
        server.stop()
    with contextlib.suppress(Exception):
        server.kill()
    if server.proc.stdout:
        server.proc.stdout.close()


def ha_env(role: str, peer_port: int, sync: bool) -> dict[str, str]:
    return {
        "VRM_HA_REPLICATION": "1",
        "VRM_HA_PEERS": f"127.0.0.1:{peer_port}",
        "VRM_HA_SECRET": SECRET,
        "VRM_HA_ROLE": role,
        "VRM_HA_SYNC": "1" if sync else "0",
        "VRM_DISABLE_RATE_LIMIT": "1",
    }


def start_setup(name: str, root: Path) -> Setup:
    """``plain``: one server; ``async`` / ``sync``: a primary and its standby, both up and the
    primary seeing its peer ``up``."""
    directory = root / name
    directory.mkdir()
    if name == "plain":
        server = start_server(directory, CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"}, timeout=60)
        return Setup(name, server)
    ports = free_port(), free_port()
    sync = name == "sync"
    standby = start_server(
        directory,
        CONFIG,
        env=ha_env("standby", ports[0], sync),
        data_dir=directory / "standby",
        port=ports[1],
        timeout=60,
    )
    try:
        primary = start_server(
            directory,
            CONFIG,
            env=ha_env("primary", ports[1], sync),
            data_dir=directory / "primary",
            port=ports[0],
            timeout=60,
        )
    except BaseException:
        stop_server(standby)
        raise
    setup = Setup(name, primary, standby)
    wait_peer_up(setup.client)
    return setup


def wait_peer_up(client: httpx.Client, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        peers = client.get("/v1/ha/status").json()["peers"]
        if peers and peers[0]["state"] == "up":
            return
        time.sleep(0.05)
    raise TimeoutError("the standby never showed up as an up-to-date peer")


def noops(n: int) -> dict[str, Any]:
    return {"tasks": [{"type": "noop"} for _ in range(n)]}


def submit(client: httpx.Client, batch: int) -> list[str]:
    answer = client.post("/api/tasks/submit_batch", json=noops(batch))
    answer.raise_for_status()
    ids: list[str] = answer.json()["task_ids"]
    if len(ids) != batch:
        raise RuntimeError(f"submitted {batch} tasks, got {len(ids)} ids back")
    return ids


def submit_round(setup: Setup, calls: int, batch: int) -> dict[str, float]:
    """``calls`` sequential submit_batch calls; tasks acknowledged per second, call latency."""
    latencies = []
    t0 = time.perf_counter()
    for _ in range(calls):
        start = time.perf_counter()
        submit(setup.client, batch)
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - t0
    return {
        "tasks_per_s": calls * batch / elapsed,
        "call_p50_ms": statistics.median(latencies) * 1e3,
        "call_p99_ms": percentile(latencies, 99) * 1e3,
    }


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def throughput(setups: dict[str, Setup], rounds: int, calls: int, batch: int) -> dict[str, Any]:
    for setup in setups.values():
        for _ in range(WARMUP_CALLS):
            submit(setup.client, batch)
    seen: dict[str, list[dict[str, float]]] = {name: [] for name in SETUPS}
    orders = []
    for r in range(rounds):
        order = SETUPS[r % len(SETUPS) :] + SETUPS[: r % len(SETUPS)]
        if r % 2:
            order = order[::-1]
        orders.append(list(order))
        for name in order:
            seen[name].append(submit_round(setups[name], calls, batch))
    out: dict[str, Any] = {"calls": calls, "batch": batch, "rounds": rounds, "orders": orders}
    base = statistics.median(run["tasks_per_s"] for run in seen["plain"])
    for name in SETUPS:
        runs = seen[name]
        rate = statistics.median(run["tasks_per_s"] for run in runs)
        out[name] = {
            "tasks_per_s": round(rate),
            "tasks_per_s_runs": [round(run["tasks_per_s"]) for run in runs],
            "call_p50_ms": round(statistics.median(run["call_p50_ms"] for run in runs), 2),
            "call_p99_ms": round(statistics.median(run["call_p99_ms"] for run in runs), 2),
            "over_plain": round(rate / base, 3),
        }
    return out


class Load:
    """Paced submissions in a thread: ``per_tick`` tasks every ``PACE_S``, on a fixed
    schedule (a late tick is sent at once, not skipped)."""

    def __init__(self, url: str, rate: float) -> None:
        self.client = httpx.Client(base_url=url, timeout=30.0)
        self.per_tick = max(1, round(rate * PACE_S))
        self.stop = threading.Event()
        self.submitted = 0
        self.last_id: tuple[str, float] | None = None
        self.started = self.ended = 0.0
        self.errors = 0

    def run(self) -> None:
        self.started = time.perf_counter()
        tick = 0
        while not self.stop.is_set():
            try:
                ids = submit(self.client, self.per_tick)
            except (httpx.HTTPError, RuntimeError):
                self.errors += 1
            else:
                self.submitted += len(ids)
                self.last_id = (ids[-1], time.perf_counter())
            tick += 1
            delay = self.started + tick * PACE_S - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        self.ended = time.perf_counter()
        self.client.close()


@dataclass
class LagSamples:
    """Every ``SAMPLE_S`` during the load: what the standby has not acknowledged, and what
    the primary has not journaled yet."""

    unacked: list[int] = field(default_factory=list)
    unjournaled: list[int] = field(default_factory=list)


def sample_lag(
    primary: httpx.Client, load: Load, seq0: int, stop: threading.Event, out: LagSamples
) -> None:
    """``last_seq - acked_seq`` of the first peer, and the tasks acknowledged to the client
    whose delta is not journaled yet (each submission is one delta: ``submitted`` minus the
    seqs journaled since the load began), every ``SAMPLE_S``."""
    while not stop.is_set():
        t = time.perf_counter()
        submitted = load.submitted
        status = primary.get("/v1/ha/status").json()
        last_seq = int(status["last_seq"])
        out.unacked.append(last_seq - int(status["peers"][0]["acked_seq"]))
        out.unjournaled.append(max(0, submitted - (last_seq - seq0)))
        time.sleep(max(0.0, SAMPLE_S - (time.perf_counter() - t)))


def probe(load: Load, standby: httpx.Client, stop: threading.Event, out: list[float]) -> None:
    """Time from a submission's answer on the primary until the standby knows its task.

    Every ``SAMPLE_S`` the latest submitted task joins a queue of probes; the oldest is asked
    of the standby every ``PROBE_POLL_S`` until it answers, then the next (deltas are applied in
    order, so a later task never shows up before an earlier one). Probes are thus taken at a
    steady pace, a long lag not making fewer of them.
    """
    pending: collections.deque[tuple[str, float]] = collections.deque()
    next_probe = time.perf_counter()
    while not (stop.is_set() and not pending):
        now = time.perf_counter()
        last = load.last_id
        if now >= next_probe and not stop.is_set() and last is not None:
            if not pending or pending[-1][0] != last[0]:
                pending.append(last)
            next_probe = now + SAMPLE_S
        if pending and known(standby, pending[0][0]):
            out.append(time.perf_counter() - pending.popleft()[1])
            continue
        time.sleep(PROBE_POLL_S)


def known(standby: httpx.Client, task_id: str) -> bool:
    answer = standby.get("/api/tasks/status", params={"task_id": task_id})
    if answer.status_code not in (200, 404):
        answer.raise_for_status()
    return answer.status_code == 200


@contextlib.contextmanager
def threads(*targets: tuple[Any, ...]) -> Iterator[None]:
    started = [threading.Thread(target=t[0], args=t[1:], daemon=True) for t in targets]
    for thread in started:
        thread.start()
    try:
        yield
    finally:
        for thread in started:
            thread.join(timeout=30)


def lag(setup: Setup, rate: float, seconds: float) -> dict[str, Any]:
    """The paced load of ``rate`` tasks/s for ``seconds`` against the pair of ``setup``."""
    assert setup.standby is not None
    load = Load(setup.primary.url, rate)
    stop = threading.Event()
    samples = LagSamples()
    probes: list[float] = []
    with (
        httpx.Client(base_url=setup.primary.url, timeout=30.0) as primary,
        httpx.Client(base_url=setup.standby.url, timeout=30.0) as standby,
    ):
        seq0 = int(primary.get("/v1/ha/status").json()["last_seq"])
        with threads(
            (sample_lag, primary, load, seq0, stop, samples),
            (probe, load, standby, stop, probes),
        ):
            with threads((load.run,)):
                time.sleep(seconds)
                load.stop.set()
            stop.set()
            caught_up = catch_up(standby, load)
    achieved = load.submitted / (load.ended - load.started)
    unacked = summary(samples.unacked)
    return {
        "what": "noop task submissions, one delta (task row) each",
        "target_per_s": rate,
        "tasks_per_call": load.per_tick,
        "achieved_per_s": round(achieved),
        "seconds": round(load.ended - load.started, 2),
        "errors": load.errors,
        "samples": len(samples.unacked),
        "unacked_deltas": unacked,
        "unacked_deltas_p50_halves": halves(samples.unacked),
        "unacked_ms_at_rate": {k: round(v / achieved * 1e3, 1) for k, v in unacked.items()},
        "unjournaled_deltas": summary(samples.unjournaled),
        "unjournaled_deltas_p50_halves": halves(samples.unjournaled),
        "probes": len(probes),
        "visible_on_standby_ms": summary([p * 1e3 for p in probes]),
        "standby_caught_up_after_s": caught_up,
    }


def catch_up(standby: httpx.Client, load: Load, timeout_s: float = 60.0) -> float | None:
    """Seconds after the load's last answer until the standby knows its last task."""
    if load.last_id is None:
        return None
    task_id, answered = load.last_id
    while not known(standby, task_id):
        if time.perf_counter() - answered > timeout_s:
            return None
        time.sleep(PROBE_POLL_S)
    return round(time.perf_counter() - answered, 3)


def summary(values: list[float] | list[int]) -> dict[str, float]:
    floats = [float(v) for v in values]
    if not floats:
        return {}
    return {
        "p50": round(statistics.median(floats), 1),
        "p99": round(percentile(floats, 99), 1),
        "max": round(max(floats), 1),
    }


def halves(values: list[int]) -> list[float]:
    """Median lag of the first and of the second half of the load: a steady lag, or a
    growing one (a standby that does not keep up)."""
    if len(values) < 2:
        return []
    half = len(values) // 2
    return [statistics.median(values[:half]), statistics.median(values[half:])]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"loadavg_before": load_average(), "cpus": os.cpu_count()}
    setups: dict[str, Setup] = {}
    try:
        for name in SETUPS:
            setups[name] = start_setup(name, root)
        result["throughput"] = throughput(setups, args.rounds, args.calls, args.batch)
        for name in ("plain", "sync"):
            setups.pop(name).stop()
        result["loadavg_mid"] = load_average()
        result["lag"] = [lag(setups["async"], rate, args.seconds) for rate in args.rates]
    finally:
        for setup in setups.values():
            setup.stop()
    result["loadavg_after"] = load_average()
    return result


def show(result: dict[str, Any]) -> None:
    t = result["throughput"]
    print(f"load average {result['loadavg_before']} -> {result['loadavg_after']}")
    print(f"{t['calls']} submit_batch calls of {t['batch']} noops, medians of {t['rounds']}")
    print(f"{'setup':>6} {'tasks/s':>8} {'ratio':>6} {'call p50 ms':>12} {'call p99 ms':>12}")
    for name in SETUPS:
        r = t[name]
        print(
            f"{name:>6} {r['tasks_per_s']:>8} {r['over_plain']:>6} "
            f"{r['call_p50_ms']:>12} {r['call_p99_ms']:>12}"
        )
    for lag_ in result["lag"]:
        print(
            f"lag at {lag_['achieved_per_s']}/s for {lag_['seconds']} s: unacknowledged deltas "
            f"{lag_['unacked_deltas']}, unjournaled {lag_['unjournaled_deltas']}, visible on "
            f"the standby after (ms) {lag_['visible_on_standby_ms']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="submit_batch calls per round")
    parser.add_argument("--batch", type=int, default=10, help="noop tasks per call")
    parser.add_argument(
        "--rates", default="1000,500", help="tasks/s of the lag loads, comma-separated"
    )
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each lag load")
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="where the data goes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        args.rates = [float(r) for r in str(args.rates).split(",")]
    except ValueError:
        parser.error(f"--rates: not a comma-separated list of numbers: {args.rates!r}")
    if args.rounds < 1 or args.calls < 1 or args.batch < 1 or min(args.rates) <= 0:
        parser.error("--rounds, --calls, --batch and --rates must be positive")
    root = Path(tempfile.mkdtemp(prefix="bench-ha-replication-", dir=args.dir))
    try:
        result = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("json", "dir")}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)


if __name__ == "__main__":
    main()
