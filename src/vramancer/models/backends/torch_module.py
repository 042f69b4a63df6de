"""An in-process PyTorch model: a factory (``module:function``) returns an ``nn.Module`` or a
pipeline object, moved between ``cpu`` and ``cuda:N`` with ``.to()``.

Pipelines: an object with ``.to()`` is moved with it; one without but with a ``.model`` (a
Hugging Face pipeline) has its ``.model`` moved and its ``.device`` updated. After every move
the pipeline is re-initialised: ``reinitialize_pipeline()`` or
``reinitialize()`` is called when the object has one. A factory that takes a ``device``
argument is given the target device. Blocking work (import, weights, ``.to()``) runs in a
worker thread. A placement on a simulated GPU runs on the CPU (``Target.runs_on``).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from vramancer.models.backends.base import (
    BackendService,
    LoadResult,
    RequestInfo,
    RunningModel,
    Target,
)
from vramancer.models.errors import BackendError
from vramancer.models.settings import ModelSpec
from vramancer.models.types import BackendKind

_REINIT_HOOKS = ("reinitialize_pipeline", "reinitialize")


def resolve_factory(path: str) -> Callable[..., Any]:
    """Import ``module:function``; ``BackendError`` names what is missing."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = " (pip install 'vramancer[torch]')" if exc.name == "torch" else ""
        raise BackendError(
            f"torch factory {path!r}: cannot import {module_name!r}: {exc}{hint}"
        ) from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise BackendError(f"torch factory {path!r}: {module_name} has no {attr!r}")
    if not callable(target):
        raise BackendError(f"torch factory {path!r} is not callable")
    return target  # type: ignore[no-any-return]


def move_object(obj: Any, device: str) -> Any:
    """Move ``obj`` to ``device`` and re-initialise its pipeline; returns the moved object."""
    mover = getattr(obj, "to", None)
    if callable(mover):
        moved = mover(device)
        obj = moved if moved is not None else obj
    else:
        inner = getattr(obj, "model", None)
        if inner is None or not callable(getattr(inner, "to", None)):
            raise BackendError(
                f"the factory returned a {type(obj).__name__}, which has neither .to() nor "
                ".model.to(); return an nn.Module or a pipeline object"
            )
        inner.to(device)
        if hasattr(obj, "device"):
            import torch

            obj.device = torch.device(device)
    for hook in _REINIT_HOOKS:
        method = getattr(obj, hook, None)
        if callable(method):
            method()
            break
    return obj


def footprint_bytes(obj: Any) -> int:
    """Bytes of the parameters and buffers of ``obj`` (or of its ``.model``)."""
    module = obj if callable(getattr(obj, "parameters", None)) else getattr(obj, "model", None)
    if module is None or not callable(getattr(module, "parameters", None)):
        return 0
    total = 0
    seen: set[int] = set()
    tensors = list(module.parameters())
    if callable(getattr(module, "buffers", None)):
        tensors += list(module.buffers())
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += int(tensor.numel()) * int(tensor.element_size())
    return total


def _device_of(obj: Any) -> str | None:
    """Where ``obj``'s first parameter lives (``cpu``, ``cuda:0``), None when unknown."""
    module = obj if callable(getattr(obj, "parameters", None)) else getattr(obj, "model", None)
    if module is None or not callable(getattr(module, "parameters", None)):
        return None
    for tensor in module.parameters():
        device = tensor.device
        return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    return None


def _free_cuda_cache() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is there whenever a torch model loaded
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TorchModel:
    """One in-process model."""

    kind = BackendKind.TORCH
    can_move = True
    reload_on_cpu = False
    service: BackendService | None = None

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._obj: Any = None
        self._size = 0  # measured once per load: a move does not change it

    async def load(self, target: Target, variant: str | None = None) -> LoadResult:
        factory = resolve_factory(variant or self.spec.factory or "")
        obj, size = await asyncio.to_thread(self._build, factory, target.runs_on)
        self._obj, self._size = obj, size
        return LoadResult(vram_bytes=size if target.on_gpu else 0, size_bytes=size)

    @staticmethod
    def _build(factory: Callable[..., Any], device: str) -> tuple[Any, int]:
        try:
            accepts_device = "device" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepts_device = False
        obj = factory(device=device) if accepts_device else factory()
        if obj is None:
            raise BackendError("the torch factory returned None")
        moved = move_object(obj, device)
        return moved, footprint_bytes(moved)

    async def move(self, target: Target) -> LoadResult:
        if self._obj is None:
            raise BackendError(f"{self.spec.name} is not loaded; nothing to move")
        obj = self._obj
        if _device_of(obj) == target.runs_on:
            # No tensor changes place (a simulated GPU runs on the CPU): no copy to wait for,
            # so no worker thread; the pipeline is still re-initialised.
            self._obj = move_object(obj, target.runs_on)
        else:
            self._obj = await asyncio.to_thread(move_object, obj, target.runs_on)
            if target.runs_on == "cpu":
                await asyncio.to_thread(_free_cuda_cache)
        size = self._size
        return LoadResult(vram_bytes=size if target.on_gpu else 0, size_bytes=size)

    async def unload(self) -> None:
        if self._obj is None:
            return
        self._obj = None
        await asyncio.to_thread(_collect)

    def handle(self) -> Any:
        return self._obj

    def request_info(self) -> RequestInfo:
        return RequestInfo()

    def find_running(self, running: Sequence[RunningModel]) -> RunningModel | None:
        return None

    async def estimate_vram(self) -> int | None:
        return None

    async def close(self) -> None:
        self._obj = None


def _collect() -> None:
    gc.collect()
    _free_cuda_cache()
