"""``ResourceOrchestrator``: resource checks, can-load, quantization advice, optimize.

It reads the device manager's cached snapshot (never a driver), hands pure policies
(:mod:`vramancer.resources.policy`) their inputs, and keeps the counters ``get_metrics`` reports
(optimizations, models unloaded, memory reclaimed, average usage). ``optimize_resources`` runs
the garbage collector, releases allocator caches (glibc ``malloc_trim``, torch CUDA/MPS caches
when torch is already imported), and asks the model manager (a :class:`ModelsOptimizer`, given
at construction) to free what it can.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

from vramancer.devices.manager import DeviceManager
from vramancer.devices.types import SystemSnapshot
from vramancer.errors import InvalidInput
from vramancer.observability import tracing
from vramancer.observability.metrics import Metrics
from vramancer.resources.actions import ModelAction, ModelActionKind
from vramancer.resources.estimator import (
    MIB,
    estimate_from_file,
    estimate_memory,
    params_from_model_id,
    parse_params,
)
from vramancer.resources.fileheaders import GGUF_MAGIC
from vramancer.resources.platform import PlatformFacts, gather_platform_facts
from vramancer.resources.policy import (
    LoadDecision,
    Recommendation,
    decide_can_load,
    recommend_quantization,
)
from vramancer.resources.ports import ModelsOptimizer
from vramancer.resources.settings import ResourcesSettings

log = logging.getLogger(__name__)

#: Largest ``estimated_size_mb`` accepted (1 PiB): anything above is a typo, not a model.
MAX_ESTIMATED_SIZE_MB = 1024.0**3
#: Less than this freed (RSS moves by a few pages on its own) does not count as "optimized".
MIN_RECLAIMED_BYTES = 1024 * 1024
#: Weight of the newest sample in the moving averages of get_metrics().
_EWMA_ALPHA = 0.1


class ResourceOrchestrator:
    """Resource checks and advice over the device manager's snapshot."""

    def __init__(
        self,
        settings: ResourcesSettings,
        devices: DeviceManager,
        *,
        metrics: Metrics,
        models: ModelsOptimizer | None = None,
        platform_facts: PlatformFacts | None = None,
    ) -> None:
        self.settings = settings
        self.devices = devices
        self.metrics = metrics
        #: The model manager optimize_resources() asks to free memory; None: no models.
        self.models = models
        #: Fixed facts for tests; None: gathered from each snapshot.
        self._facts = platform_facts
        self._lock = threading.Lock()
        self._report_for: SystemSnapshot | None = None
        self._report: dict[str, Any] = {}
        self._stats = {
            "optimizations": 0,
            "models_unloaded": 0,
            "host_reclaimed_bytes": 0,
            "gpu_reclaimed_bytes": 0,
            "can_load_checks": 0,
            "can_load_refusals": 0,
        }
        self._avg_host: float | None = None
        self._avg_gpu: float | None = None
        self._last_optimization: dict[str, Any] | None = None
        node = metrics.node
        self._m_optimizations = metrics.counter(
            "resources_optimizations_total", "optimize_resources() runs.", ("node",)
        ).labels(node)
        self._m_reclaimed = metrics.counter(
            "resources_reclaimed_bytes_total",
            "Memory freed by optimize_resources(), by kind (host or gpu).",
            ("node", "memory"),
        )
        self._m_can_load = metrics.counter(
            "resources_can_load_checks_total", "can_load_model() answers.", ("node", "result")
        )
        devices.on_refresh(self._sample)

    # -- public API ------------------------------------------------------------------------

    @property
    def memory_threshold(self) -> float:
        return self.settings.memory_threshold

    @property
    def gpu_memory_threshold(self) -> float:
        return self.settings.gpu_memory_threshold

    def check_resources(self) -> dict[str, Any]:
        """CPU, RAM, swap and every GPU from the cached snapshot, with pressure flags.

        The dict is rebuilt only when the snapshot changes, so this is cheap to call often.
        Callers must not mutate it.
        """
        snap = self.devices.snapshot()
        with self._lock:
            if snap is not self._report_for:
                self._report = self._build_report(snap)
                self._report_for = snap
            return self._report

    def get_metrics(self) -> dict[str, Any]:
        """The counters: optimizations, models unloaded, memory reclaimed, averages."""
        with self._lock:
            s = dict(self._stats)
            return {
                "optimizations_total": s["optimizations"],
                "models_unloaded_total": s["models_unloaded"],
                "memory_reclaimed_bytes": {
                    "host": s["host_reclaimed_bytes"],
                    "gpu": s["gpu_reclaimed_bytes"],
                },
                "can_load_checks_total": s["can_load_checks"],
                "can_load_refusals_total": s["can_load_refusals"],
                "average_host_memory_used_ratio": self._avg_host,
                "average_gpu_memory_used_ratio": self._avg_gpu,
                "last_optimization": self._last_optimization,
                "thresholds": self._thresholds(),
            }

    def can_load_model(self, model_id: str, estimated_size_mb: float) -> LoadDecision:
        """Would a model of ``estimated_size_mb`` MiB fit now (GPU first, then host RAM)?"""
        if not model_id or not model_id.strip():
            raise InvalidInput("model_id: must not be empty", field="model_id")
        size = float(estimated_size_mb)
        if not 0 <= size <= MAX_ESTIMATED_SIZE_MB:
            raise InvalidInput(
                f"estimated_size_mb: must be between 0 and {MAX_ESTIMATED_SIZE_MB:.0f} "
                f"(got {estimated_size_mb!r})",
                field="estimated_size_mb",
            )
        decision = decide_can_load(
            self.devices.snapshot(),
            int(size * MIB),
            memory_threshold=self.memory_threshold,
            gpu_memory_threshold=self.gpu_memory_threshold,
        )
        with self._lock:
            self._stats["can_load_checks"] += 1
            self._stats["can_load_refusals"] += 0 if decision.can_load else 1
        self._m_can_load.labels(self.metrics.node, "yes" if decision else "no").inc()
        return decision

    def platform_facts(self) -> PlatformFacts:
        """The facts the advisor uses (fixed ones when given at construction)."""
        if self._facts is not None:
            return self._facts
        return gather_platform_facts(self.devices.snapshot())

    def recommend_quantization_method(
        self,
        model_id: str,
        params: str | int | None = None,
        file: str | Path | None = None,
        *,
        gguf: bool = False,
    ) -> Recommendation:
        """The quantization advice for ``model_id`` here. The model's size comes from ``file``
        (a GGUF/safetensors header), else ``params`` (``7B``), else the model id
        (``Mistral-7B``); unknown is allowed.
        ``gguf`` says the model is a GGUF build (also detected from ``file`` and the id)."""
        if not model_id or not model_id.strip():
            raise InvalidInput("model_id: must not be empty", field="model_id")
        required: int | None
        if file is not None:
            required = estimate_from_file(file, quantization="f16").total_bytes
            gguf = gguf or _is_gguf_file(Path(file))
        elif params is not None:
            required = estimate_memory(parse_params(params), "f16").total_bytes
        else:
            guessed = params_from_model_id(model_id)
            required = estimate_memory(guessed, "f16").total_bytes if guessed else None
        return recommend_quantization(
            self.platform_facts(), model_id, required_bytes=required, gguf=gguf
        )

    async def optimize_resources(self) -> dict[str, Any]:
        """GC, allocator cache release, then the model manager's own optimisation.

        Returns ``optimized`` (something was freed or a model action was
        taken), ``actions_taken``, ``memory_before`` and ``memory_after`` (bytes, by kind),
        plus ``reclaimed_bytes``.
        """
        with tracing.span("resources.optimize"):
            before = await self._memory_state()
            actions = await asyncio.to_thread(release_caches)
            model_actions: list[ModelAction] = []
            if self.models is not None:
                model_actions = list(await self.models.optimize())
                actions += [str(a) for a in model_actions]
            after = await self._memory_state()
        kinds = [a.kind for a in model_actions]
        models_freed = kinds.count(ModelActionKind.UNLOADED)
        models_acted = any(k is not ModelActionKind.FAILED for k in kinds)
        host_freed = max(0, before["process_rss_bytes"] - after["process_rss_bytes"])
        gpu_freed = max(0, before["gpu_used_bytes"] - after["gpu_used_bytes"])
        optimized = (
            host_freed >= MIN_RECLAIMED_BYTES or gpu_freed >= MIN_RECLAIMED_BYTES or models_acted
        )
        result = {
            "optimized": optimized,
            "actions_taken": actions,
            "memory_before": before,
            "memory_after": after,
            "reclaimed_bytes": {"host": host_freed, "gpu": gpu_freed},
        }
        with self._lock:
            self._stats["optimizations"] += 1
            self._stats["models_unloaded"] += models_freed
            self._stats["host_reclaimed_bytes"] += host_freed
            self._stats["gpu_reclaimed_bytes"] += gpu_freed
            self._last_optimization = {"actions_taken": len(actions), "optimized": optimized}
        node = self.metrics.node
        self._m_optimizations.inc()
        self._m_reclaimed.labels(node, "host").inc(host_freed)
        self._m_reclaimed.labels(node, "gpu").inc(gpu_freed)
        return result

    # -- internals ---------------------------------------------------------------------------

    def _thresholds(self) -> dict[str, float]:
        return {
            "memory_threshold": self.memory_threshold,
            "gpu_memory_threshold": self.gpu_memory_threshold,
        }

    async def _memory_state(self) -> dict[str, int]:
        snap = await self.devices.refresh_async()
        rss = psutil.Process().memory_info().rss
        return {
            "process_rss_bytes": int(rss),
            "host_used_bytes": snap.host.memory_used_bytes,
            "host_available_bytes": snap.host.memory_available_bytes,
            "gpu_used_bytes": sum(g.memory_used_bytes for g in snap.gpus),
        }

    def _sample(self, snap: SystemSnapshot) -> None:
        """Moving averages of memory use, fed by every device poll."""
        host = snap.host
        host_ratio = (
            1 - host.memory_available_bytes / host.memory_total_bytes
            if host.memory_total_bytes
            else 0.0
        )
        totals = sum(g.memory_total_bytes for g in snap.gpus)
        gpu_ratio = sum(g.memory_used_bytes for g in snap.gpus) / totals if totals else None
        with self._lock:
            self._avg_host = _ewma(self._avg_host, host_ratio)
            if gpu_ratio is not None:
                self._avg_gpu = _ewma(self._avg_gpu, gpu_ratio)

    def _build_report(self, snap: SystemSnapshot) -> dict[str, Any]:
        host = snap.host
        used_ratio = (
            host.memory_used_bytes / host.memory_total_bytes if host.memory_total_bytes else 0
        )
        gpus = []
        for g in snap.gpus:
            ratio = g.memory_used_bytes / g.memory_total_bytes if g.memory_total_bytes else 0.0
            gpus.append(
                {
                    "index": g.index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "backend": g.vendor.value,
                    "simulated": g.simulated,
                    "torch_device": g.torch_device,
                    "memory_total_bytes": g.memory_total_bytes,
                    "memory_used_bytes": g.memory_used_bytes,
                    "memory_free_bytes": g.memory_free_bytes,
                    "memory_used_ratio": round(ratio, 4),
                    "utilization_ratio": g.utilization_ratio,
                    "temperature_celsius": g.temperature_celsius,
                    "power_watts": g.power_watts,
                    "over_threshold": ratio > self.gpu_memory_threshold,
                    "error": g.error,
                }
            )
        host_over = used_ratio > self.memory_threshold
        return {
            "node": self.metrics.node,
            "taken_at": snap.taken_at,
            "cpu_only": snap.cpu_only,
            "cpu": {
                "count": host.cpu_count,
                "utilization_ratio": host.cpu_utilization_ratio,
            },
            "memory": {
                "total_bytes": host.memory_total_bytes,
                "available_bytes": host.memory_available_bytes,
                "used_bytes": host.memory_used_bytes,
                "used_ratio": round(used_ratio, 4),
                "swap_total_bytes": host.swap_total_bytes,
                "swap_used_bytes": host.swap_used_bytes,
                "over_threshold": host_over,
            },
            "gpus": gpus,
            "thresholds": self._thresholds(),
            "needs_optimization": host_over or any(g["over_threshold"] for g in gpus),
        }


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + _EWMA_ALPHA * (sample - previous)


def _is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def release_caches() -> list[str]:
    """Run the GC and give cached allocator memory back; returns what was done, in words."""
    actions = [f"gc: collected {gc.collect()} objects"]
    torch = sys.modules.get("torch")  # only if something already imported it
    if torch is not None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
            actions.append("torch: released the CUDA caching allocator's free blocks")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            torch.mps.empty_cache()
            actions.append("torch: released the MPS allocator cache")
    if _malloc_trim():
        actions.append("libc: malloc_trim returned free heap pages to the OS")
    return actions


def _malloc_trim() -> bool:
    """glibc's ``malloc_trim(0)``; False where there is no glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
