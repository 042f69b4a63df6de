"""The Ollama client and backend against the fake Ollama server (real HTTP on a free port)."""

from __future__ import annotations

import httpx
import pytest

from tests.fakes.ollama import FakeOllama, keep_alive_seconds
from tests.unit.models.conftest import VLM, VLM_SIZE
from vramancer.errors import BackendUnavailable, OperationTimeout
from vramancer.models.backends.base import Target
from vramancer.models.backends.ollama import OllamaClient, OllamaModel
from vramancer.models.errors import BackendError, ModelNotInBackend
from vramancer.models.settings import ModelSpec, OllamaSettings

GPU = Target("gpu:0", "cpu", simulated=True, cuda_index=None)


def client_for(fake: FakeOllama, **kw: object) -> OllamaClient:
    return OllamaClient(OllamaSettings(endpoint=fake.url, **kw))  # type: ignore[arg-type]


def model_for(client: OllamaClient, name: str = VLM, **kw: object) -> OllamaModel:
    spec = ModelSpec(name=name, backend="ollama", **kw)  # type: ignore[arg-type]
    return OllamaModel(spec, client, load_timeout_s=5.0, unload_timeout_s=5.0)


def test_fake_follows_the_documented_shapes(fake_ollama: FakeOllama) -> None:
    base = fake_ollama.url
    assert httpx.get(base + "/api/version").json() == {"version": "0.6.5"}
    load = httpx.post(base + "/api/generate", json={"model": VLM}).json()
    assert set(load) == {"model", "created_at", "response", "done", "done_reason"}
    assert (load["model"], load["response"], load["done"], load["done_reason"]) == (
        VLM,
        "",
        True,
        "load",
    )
    ps = httpx.get(base + "/api/ps").json()
    (entry,) = ps["models"]
    assert set(entry) == {
        "name",
        "model",
        "size",
        "digest",
        "details",
        "expires_at",
        "size_vram",
        "context_length",
    }
    assert set(entry["details"]) == {
        "parent_model",
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
    }
    assert entry["size"] == entry["size_vram"] == VLM_SIZE
    unload = httpx.post(base + "/api/generate", json={"model": VLM, "keep_alive": 0}).json()
    assert unload["done_reason"] == "unload"
    assert httpx.get(base + "/api/ps").json() == {"models": []}
    missing = httpx.post(base + "/api/generate", json={"model": "nope"})
    assert missing.status_code == 404
    assert missing.json() == {"error": "model 'nope' not found, try pulling it first"}


def test_keep_alive_durations_follow_ollamas_decoder() -> None:
    assert keep_alive_seconds("5m") == 300
    assert keep_alive_seconds("1h30m") == 5400
    assert keep_alive_seconds("1.5h") == 5400
    assert keep_alive_seconds("250ms") == 0.25
    assert keep_alive_seconds(0) == 0
    assert keep_alive_seconds("0") == 0
    assert keep_alive_seconds(90.9) == 90  # a number is whole seconds
    assert keep_alive_seconds(-1) is None
    assert keep_alive_seconds("-1m") is None
    assert keep_alive_seconds(None) == 300
    # Go's time.ParseDuration wants a unit: Ollama refuses the string "-1" (a 400)
    with pytest.raises(ValueError, match='missing unit in duration "-1"'):
        keep_alive_seconds("-1")
    with pytest.raises(ValueError, match='invalid duration "soon"'):
        keep_alive_seconds("soon")
    with pytest.raises(ValueError, match="Unsupported type"):
        keep_alive_seconds(True)


def test_fake_answers_400_to_a_keep_alive_ollama_refuses(fake_ollama: FakeOllama) -> None:
    r = httpx.post(fake_ollama.url + "/api/generate", json={"model": VLM, "keep_alive": "-1"})
    assert r.status_code == 400
    assert r.json() == {"error": 'time: missing unit in duration "-1"'}
    assert fake_ollama.loaded == {}


def test_names_without_a_tag_are_latest(fake_ollama: FakeOllama) -> None:
    fake_ollama.add_model("llama3", "4GiB")
    r = httpx.post(fake_ollama.url + "/api/generate", json={"model": "llama3"})
    assert r.json()["model"] == "llama3"  # echoed as asked
    (entry,) = httpx.get(fake_ollama.url + "/api/ps").json()["models"]
    assert entry["name"] == entry["model"] == "llama3:latest"


async def test_load_sends_keep_alive_and_no_prompt_then_measures_with_ps(
    fake_ollama: FakeOllama,
) -> None:
    client = client_for(fake_ollama)
    try:
        model = model_for(client, keep_alive="10m")
        result = await model.load(GPU)
        assert result.vram_bytes == VLM_SIZE
        assert result.size_bytes == VLM_SIZE
        body = fake_ollama.requests[0].body
        assert body == {"model": VLM, "keep_alive": "10m", "stream": False}
        running = await client.ps()
        assert [r.name for r in running] == [VLM]
        await model.unload()
        generates = [r.body for r in fake_ollama.requests if r.path == "/api/generate"]
        assert generates[-1] == {"model": VLM, "keep_alive": 0, "stream": False}
        assert await client.ps() == []
        assert await client.version() == "0.6.5"
    finally:
        await client.aclose()


async def test_cpu_placement_sends_num_gpu_0_and_default_keep_alive(
    fake_ollama: FakeOllama,
) -> None:
    client = client_for(fake_ollama, keep_alive="-1")  # a string Ollama would refuse
    try:
        result = await model_for(client).load(Target.cpu())
        assert fake_ollama.requests[0].body["options"] == {"num_gpu": 0}
        assert fake_ollama.requests[0].body["keep_alive"] == -1  # sent as a number
        assert result.vram_bytes == 0
        assert fake_ollama.loaded[VLM].size_vram == 0
    finally:
        await client.aclose()


async def test_variant_loads_another_tag(fake_ollama: FakeOllama) -> None:
    client = client_for(fake_ollama)
    try:
        model = model_for(client)
        result = await model.load(GPU, variant="small:1b")
        assert model.tag == "small:1b"
        assert result.vram_bytes == 1024**3
    finally:
        await client.aclose()


async def test_errors_are_typed(fake_ollama: FakeOllama) -> None:
    client = client_for(fake_ollama)
    try:
        with pytest.raises(ModelNotInBackend, match="not found, try pulling it first"):
            await model_for(client, name="ghost:1b").load(GPU)
        fake_ollama.fail_status = 500
        with pytest.raises(BackendError, match="HTTP 500"):
            await client.version()
        fake_ollama.fail_status = None
        fake_ollama.load_delay_s = 1.0
        with pytest.raises(OperationTimeout):
            await client.generate_load(VLM, "-1", None, timeout_s=0.1)
        fake_ollama.load_delay_s = 0.0
        fake_ollama.die_on_next_load()
        with pytest.raises(BackendUnavailable, match="lost"):
            await model_for(client).load(GPU)
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await client.version()
    finally:
        await client.aclose()


async def test_down_at_start_then_back(fake_ollama: FakeOllama) -> None:
    fake_ollama.go_down()
    client = client_for(fake_ollama, connect_timeout_s=0.5)
    try:
        with pytest.raises(BackendUnavailable, match=f"unreachable at {fake_ollama.url}"):
            await client.ps()
        fake_ollama.come_back()
        assert await client.ps() == []
    finally:
        await client.aclose()


async def test_a_model_named_without_a_tag_is_measured_and_unloaded(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.add_model("llama3", "4GiB")
    client = client_for(fake_ollama)
    try:
        model = model_for(client, name="llama3")
        result = await model.load(GPU)  # /api/ps says llama3:latest
        assert result.vram_bytes == 4 * 1024**3
        await model.unload()
        assert await client.ps() == []
    finally:
        await client.aclose()


async def test_unload_returns_only_once_ps_no_longer_lists_the_model(
    fake_ollama: FakeOllama,
) -> None:
    """Ollama answers an unload when the runner is scheduled to expire; the model may stay in
    /api/ps a while. The backend's unload waits for it to be gone."""
    fake_ollama.unload_lag_s = 0.3
    client = client_for(fake_ollama)
    try:
        model = model_for(client)
        await model.load(GPU)
        answered = httpx.post(
            fake_ollama.url + "/api/generate", json={"model": VLM, "keep_alive": 0}
        )
        assert answered.json()["done_reason"] == "unload"
        assert [r.name for r in await client.ps()] == [VLM]  # still there right after
        await model.load(GPU)
        await model.unload()
        assert await client.ps() == []
        polls = [r for r in fake_ollama.requests if r.path == "/api/ps"]
        assert len(polls) >= 3  # it polled until the model was gone
    finally:
        await client.aclose()
