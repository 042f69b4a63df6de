"""The model manager's Prometheus instruments, and how a model's state is exported."""

from __future__ import annotations

from vramancer.models.entry import ModelEntry
from vramancer.models.types import ModelState
from vramancer.observability.metrics import Metrics

_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class ModelMetrics:
    def __init__(self, metrics: Metrics) -> None:
        labels = ("model", "backend")
        self.state = metrics.gauge(
            "vramancer_model_state", "1 for the state each managed model is in.", (*labels, "state")
        )
        self.vram = metrics.gauge(
            "vramancer_model_vram_bytes", "VRAM a managed model holds now.", labels
        )
        self.in_use = metrics.gauge(
            "vramancer_model_in_use", "Users inside use() of a model.", labels
        )
        self.load = metrics.histogram(
            "vramancer_model_load_duration_seconds",
            "Time to load (or move) a model.",
            labels,
            buckets=_LOAD_BUCKETS,
        )
        self.loads = metrics.counter(
            "vramancer_model_loads_total", "Model loads by result.", (*labels, "result")
        )
        self.unloads = metrics.counter(
            "vramancer_model_unloads_total", "Model unloads by reason.", (*labels, "reason")
        )
        self.degraded = metrics.gauge(
            "vramancer_models_backend_degraded",
            "1 while a model backend is unreachable.",
            ("backend",),
        )
        self.queue = metrics.gauge(
            "vramancer_model_queue_waiting", "Requests waiting for a model to load."
        )
        self.mode = metrics.gauge(
            "vramancer_execution_mode", "1 for the profile (execution mode) in force.", ("mode",)
        )

    def export_state(self, entry: ModelEntry) -> None:
        for state in ModelState:
            self.state.labels(model=entry.name, backend=entry.kind.value, state=state.value).set(
                1 if state is entry.state else 0
            )
        self.vram.labels(model=entry.name, backend=entry.kind.value).set(entry.used_bytes)

    def export_in_use(self, entry: ModelEntry) -> None:
        self.in_use.labels(model=entry.name, backend=entry.kind.value).set(entry.in_use)
