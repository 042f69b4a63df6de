"""``optimize`` for models (the resources orchestrator's optimize step): the plan is
``policy.plan_optimize`` (unload idle models, then on GPUs above ``pressure_ratio`` switch to
smaller variants and unload the least recently used); this runs it and reports each step as a
``ModelAction`` (unloaded, switched, or failed with the reason)."""

from __future__ import annotations

import contextlib

from vramancer.errors import VramancerError
from vramancer.models import policy
from vramancer.models.entry import ModelEntry
from vramancer.models.lifecycle import Lifecycle
from vramancer.models.locks import Locks
from vramancer.models.ports import DevicePort
from vramancer.models.table import ModelTable
from vramancer.models.types import CPU, ModelState
from vramancer.resources.actions import ModelAction, ModelActionKind
from vramancer.units import format_size


class Optimizer:
    def __init__(
        self, table: ModelTable, *, devices: DevicePort, locks: Locks, lifecycle: Lifecycle
    ) -> None:
        self.table = table
        self.devices = devices
        self.locks = locks
        self.lifecycle = lifecycle

    async def optimize(self) -> list[ModelAction]:
        table = self.table
        views = list(table.views().values())
        usage = {
            g.index: policy.GpuUsage(g.memory_used_bytes, g.memory_total_bytes)
            for g in self.devices.snapshot().gpus
        }
        actions = policy.plan_optimize(
            views,
            usage,
            idle_after_s=table.gm.optimize_idle_s,
            pressure_ratio=table.gm.pressure_ratio,
        )
        done: list[ModelAction] = []
        for action in actions:
            message = await self._optimize_one(action)
            if message:
                done.append(message)
        return done

    async def _optimize_one(self, action: policy.OptimizeAction) -> ModelAction | None:
        entry = self.table.entries[action.model]
        try:
            async with self.locks.locked(entry):
                if entry.state is not ModelState.LOADED or entry.in_use or entry.draining:
                    return None
                device = entry.device or CPU
                if action.kind is policy.OptimizeKind.SMALLER_VARIANT:
                    return await self._to_variant(entry, device)
                await self.lifecycle.unload_locked(entry, "optimize")
        except VramancerError as exc:
            message = f"could not optimize {entry.name}: {exc.message}"
            return ModelAction(ModelActionKind.FAILED, entry.name, message)
        why = "idle" if action.kind is policy.OptimizeKind.UNLOAD_IDLE else "least recently used"
        message = f"unloaded {entry.name} from {device} ({why}, {format_size(action.freed_bytes)})"
        return ModelAction(ModelActionKind.UNLOADED, entry.name, message)

    async def _to_variant(self, entry: ModelEntry, device: str) -> ModelAction:
        variant = entry.spec.smaller_variant
        assert variant is not None
        before = entry.used_bytes
        lifecycle = self.lifecycle
        await lifecycle.unload_locked(entry, "optimize")
        entry.variant = variant
        try:
            await lifecycle.load_locked(entry, device, "smaller variant")
        except VramancerError as exc:
            entry.variant = None
            with contextlib.suppress(VramancerError):
                await lifecycle.load_locked(entry, device, "variant failed; back to the original")
            message = f"could not switch {entry.name} to {variant}: {exc.message}"
            return ModelAction(ModelActionKind.FAILED, entry.name, message)
        message = (
            f"switched {entry.name} to smaller variant {variant} on {device} "
            f"({format_size(before)} -> {format_size(entry.used_bytes)})"
        )
        return ModelAction(ModelActionKind.SWITCHED, entry.name, message)
