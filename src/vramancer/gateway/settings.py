"""Settings of ``[gateway]``: the Ollama- and OpenAI-compatible endpoints."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vramancer.units import Size


class GatewaySettings(BaseModel):
    """``[gateway]``: queues, limits and the optional native port of the model gateway."""

    model_config = ConfigDict(extra="forbid")

    #: Also serve both surfaces at their native paths (``/v1/...``, ``/api/...``) on this port
    #: (11434 is Ollama's), so an unmodified client can be pointed at VRAMancer. None: only
    #: ``/openai/v1`` and ``/ollama/api`` on the API port.
    port: int | None = Field(default=None, ge=1, le=65535)
    #: Requests for the resident model are served before a swap, but a request that waited
    #: this long makes the swap happen (the resident model stops taking new requests).
    max_wait_s: float = Field(default=10.0, gt=0)
    #: Requests served at once by one model (more wait in its queue).
    max_concurrent: int = Field(default=4, ge=1, le=1024)
    #: Per model overrides of ``max_concurrent``: ``{ "qwen3:8b" = 2 }``.
    max_concurrent_per_model: dict[str, int] = Field(default_factory=dict)
    #: Requests waiting for one model (beyond those it serves at once); one more is refused
    #: with 429 and ``Retry-After``. 0: only requests the model can serve at once.
    queue_length: int = Field(default=64, ge=0, le=100_000)
    #: A request still waiting for its model after this is refused with 503 and ``Retry-After``.
    timeout_s: float = Field(default=120.0, gt=0)
    #: Largest request body of a gateway call (413 above).
    max_body_bytes: Size = Field(default=4 * 1024 * 1024, gt=0)

    def concurrency(self, model: str) -> int:
        return self.max_concurrent_per_model.get(model, self.max_concurrent)
