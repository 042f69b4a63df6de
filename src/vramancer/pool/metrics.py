"""The pool's nodes as Prometheus series, read from the registry's copy at each scrape: an
orchestrator's ``/metrics`` shows every node of the pool (label ``node``), not only itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vramancer.pool.registry import NodeInfo, NodeState


class PoolCollector(Collector):
    """``vramancer_pool_node_up``, ``..._heartbeat_age_seconds``, ``..._running_tasks`` per
    node; ``vramancer_pool_gpu_memory_{total,used,grantable}_bytes`` per node and GPU."""

    def __init__(
        self,
        nodes: Callable[[], list[NodeInfo]],
        state: Callable[[NodeInfo, float], NodeState],
        now: Callable[[], float],
    ) -> None:
        self._nodes, self._state, self._now = nodes, state, now

    def collect(self) -> Iterator[Metric]:
        now = self._now()
        up = GaugeMetricFamily(
            "vramancer_pool_node_up",
            "1 when the node is up, 0 when stale or down.",
            labels=["node"],
        )
        age = GaugeMetricFamily(
            "vramancer_pool_node_heartbeat_age_seconds",
            "Seconds since the node's last heartbeat.",
            labels=["node"],
        )
        running = GaugeMetricFamily(
            "vramancer_pool_node_running_tasks",
            "Tasks the node reported running at its last heartbeat.",
            labels=["node"],
        )
        labels = ["node", "device"]
        total = GaugeMetricFamily(
            "vramancer_pool_gpu_memory_total_bytes", "VRAM of a GPU of the pool.", labels=labels
        )
        used = GaugeMetricFamily(
            "vramancer_pool_gpu_memory_used_bytes",
            "VRAM in use on a GPU of the pool, as its driver reported it.",
            labels=labels,
        )
        grantable = GaugeMetricFamily(
            "vramancer_pool_gpu_grantable_bytes",
            "VRAM the node's arbiter could still grant on a GPU at its last heartbeat.",
            labels=labels,
        )
        for node in self._nodes():
            up.add_metric([node.name], 1.0 if self._state(node, now) is NodeState.UP else 0.0)
            age.add_metric([node.name], max(0.0, now - node.last_heartbeat))
            running.add_metric([node.name], float(node.running_tasks))
            for dev in node.devices:
                total.add_metric([node.name, dev.id], float(dev.memory_total_bytes))
                used.add_metric([node.name, dev.id], float(dev.memory_used_bytes))
                grantable.add_metric([node.name, dev.id], float(dev.grantable_bytes))
        yield from (up, age, running, total, used, grantable)
