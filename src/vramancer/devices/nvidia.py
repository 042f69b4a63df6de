"""NVIDIA GPUs through NVML (nvidia-ml-py). The only module that imports ``pynvml``.

Every NVML call goes through :func:`query`: a value the device does not report (not supported,
not found, no permission) is ``None``; any other failure is a :class:`NvmlError`. The binding is
passed in (``NvidiaBackend.open(nvml)``), so tests drive this module with a fake NVML.
"""

from __future__ import annotations

import logging
from typing import Any

from vramancer.devices.backend import DeviceQueryError
from vramancer.devices.types import DeviceVendor, GpuProcess, GpuSnapshot, MigInstance

log = logging.getLogger(__name__)

#: NVML return codes that mean "this value is not available here", not "the call failed".
_NOT_AVAILABLE_CODE_NAMES = (
    "NVML_ERROR_NOT_SUPPORTED",
    "NVML_ERROR_NOT_FOUND",
    "NVML_ERROR_NO_PERMISSION",
    "NVML_ERROR_FUNCTION_NOT_FOUND",
)
#: At most this many process names are remembered (names are looked up once per pid).
_NAME_CACHE_MAX = 4096


class NvmlError(DeviceQueryError):
    """An NVML call failed; ``details['nvml_code']`` holds NVML's return code."""

    code = "nvml_error"


def load_pynvml() -> Any | None:
    """The ``pynvml`` module, or ``None`` when nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def query(nvml: Any, fn_name: str, *args: Any) -> Any | None:
    """Call ``nvml.<fn_name>(*args)``: ``None`` when not available, ``NvmlError`` on failure."""
    fn = getattr(nvml, fn_name, None)
    if fn is None:  # an older binding without this call
        return None
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        code = getattr(exc, "value", None)
        unavailable = {getattr(nvml, name, None) for name in _NOT_AVAILABLE_CODE_NAMES}
        if code is not None and code in unavailable:
            return None
        raise NvmlError(f"{fn_name} failed: {exc}", nvml_code=code) from exc


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvidiaBackend:
    """The NVIDIA GPUs NVML sees, in NVML order (``cuda_index`` is that order)."""

    vendor = DeviceVendor.NVIDIA

    def __init__(
        self,
        nvml: Any,
        handles: list[Any],
        uuids: list[str],
        names: list[str],
        nvml_indices: list[int] | None = None,
    ):
        self._nvml = nvml
        self._handles = handles
        self._uuids = uuids
        self._names = names
        #: Each GPU's NVML index (its CUDA index in PCI bus order); GPUs NVML refused to open
        #: are skipped, so this is not always 0..n-1.
        self._nvml_indices = nvml_indices if nvml_indices is not None else list(range(len(handles)))
        self._process_names: dict[int, str | None] = {}
        self._closed = False

    @classmethod
    def open(cls, nvml: Any | None = None) -> NvidiaBackend | None:
        """Initialise NVML and list the GPUs; ``None`` when there is no driver or no GPU."""
        nvml = nvml if nvml is not None else load_pynvml()
        if nvml is None:
            log.debug(
                "nvidia-ml-py is not installed; NVIDIA GPUs are not probed "
                "(pip install 'vramancer[gpu]')"
            )
            return None
        try:
            query(nvml, "nvmlInit")
        except NvmlError as exc:
            log.info("NVIDIA: NVML is not available (%s)", exc.message)
            return None
        try:
            count = int(query(nvml, "nvmlDeviceGetCount") or 0)
            opened = [(i, query(nvml, "nvmlDeviceGetHandleByIndex", i)) for i in range(count)]
            for i, handle in opened:
                if handle is None:  # no permission (a container given other GPUs), not found
                    log.warning("NVIDIA: GPU %d cannot be opened through NVML; skipping it", i)
            opened = [(i, h) for i, h in opened if h is not None]
            handles = [h for _, h in opened]
            uuids = [_text(query(nvml, "nvmlDeviceGetUUID", h) or f"nvidia-{i}") for i, h in opened]
            names = [_text(query(nvml, "nvmlDeviceGetName", h) or "NVIDIA GPU") for h in handles]
        except NvmlError as exc:
            log.warning("NVIDIA: listing GPUs failed (%s)", exc.message)
            query_quietly(nvml, "nvmlShutdown")
            return None
        if not handles:
            query_quietly(nvml, "nvmlShutdown")
            return None
        return cls(nvml, handles, uuids, names, [i for i, _ in opened])

    def device_count(self) -> int:
        return len(self._handles)

    def read(self, local_index: int) -> GpuSnapshot:
        """One GPU's memory, utilization, temperature, power, processes and MIG slices."""
        nvml, handle = self._nvml, self._handles[local_index]
        mem = query(nvml, "nvmlDeviceGetMemoryInfo", handle)
        if mem is None:
            raise NvmlError(f"GPU {self._uuids[local_index]} does not report its memory")
        util = query(nvml, "nvmlDeviceGetUtilizationRates", handle)
        temp = query(nvml, "nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU)
        power_mw = query(nvml, "nvmlDeviceGetPowerUsage", handle)
        return GpuSnapshot(
            index=local_index,
            uuid=self._uuids[local_index],
            name=self._names[local_index],
            vendor=DeviceVendor.NVIDIA,
            memory_total_bytes=int(mem.total),
            memory_used_bytes=int(mem.used),
            memory_free_bytes=int(mem.free),
            utilization_ratio=None if util is None else float(util.gpu) / 100.0,
            temperature_celsius=None if temp is None else float(temp),
            power_watts=None if power_mw is None else float(power_mw) / 1000.0,
            processes=self._processes(handle),
            mig=self._mig(handle),
            cuda_index=self._nvml_indices[local_index],
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            query_quietly(self._nvml, "nvmlShutdown")

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        seen: dict[int, GpuProcess] = {}
        for fn_name in (
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        ):
            for proc in query(self._nvml, fn_name, handle) or ():
                pid = int(proc.pid)
                used = getattr(proc, "usedGpuMemory", None)
                if pid not in seen:
                    seen[pid] = GpuProcess(
                        pid=pid,
                        used_memory_bytes=None if used is None else int(used),
                        name=self._process_name(pid),
                    )
        return tuple(sorted(seen.values(), key=lambda p: p.pid))

    def _process_name(self, pid: int) -> str | None:
        if pid not in self._process_names:
            if len(self._process_names) >= _NAME_CACHE_MAX:
                self._process_names.clear()
            try:
                name = query(self._nvml, "nvmlSystemGetProcessName", pid)
            except NvmlError:
                name = None
            self._process_names[pid] = None if name is None else _text(name)
        return self._process_names[pid]

    def _mig(self, handle: Any) -> tuple[MigInstance, ...]:
        nvml = self._nvml
        mode = query(nvml, "nvmlDeviceGetMigMode", handle)
        if mode is None or mode[0] != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
            return ()
        slices = []
        for i in range(int(query(nvml, "nvmlDeviceGetMaxMigDeviceCount", handle) or 0)):
            mig = query(nvml, "nvmlDeviceGetMigDeviceHandleByIndex", handle, i)
            if mig is None:  # slot not populated
                continue
            uuid = query(nvml, "nvmlDeviceGetUUID", mig)
            mem = query(nvml, "nvmlDeviceGetMemoryInfo", mig)
            slices.append(
                MigInstance(
                    index=i,
                    uuid=None if uuid is None else _text(uuid),
                    memory_total_bytes=None if mem is None else int(mem.total),
                    memory_used_bytes=None if mem is None else int(mem.used),
                )
            )
        return tuple(slices)


def query_quietly(nvml: Any, fn_name: str, *args: Any) -> Any | None:
    """Like :func:`query` but a failure is logged, not raised (shutdown paths)."""
    try:
        return query(nvml, fn_name, *args)
    except NvmlError as exc:
        log.debug("NVML %s failed: %s", fn_name, exc.message)
        return None
