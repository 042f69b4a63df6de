"""Request and response bodies of the model gateway (``/openai/v1/...``, ``/ollama/api/...``).

Requests keep the fields they do not name (``extra="allow"``): they are forwarded to the
model's server as the client sent them, so options VRAMancer does not know still work. Only
what the gateway itself needs is checked. Bounds keep one request from holding the server.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vramancer.api.schemas import ErrorDetail

#: Longest model name accepted.
MAX_NAME = 256
#: Most messages of a chat, inputs of an embedding request.
MAX_ITEMS = 4096

ModelName = Field(min_length=1, max_length=MAX_NAME)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- OpenAI ---------------------------------------------------------------------------------------


class ChatCompletionRequest(_Open):
    """``POST /openai/v1/chat/completions``."""

    model: str = ModelName
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ITEMS)
    stream: bool = False


class CompletionRequest(_Open):
    """``POST /openai/v1/completions``."""

    model: str = ModelName
    prompt: str | list[str] = ""
    stream: bool = False


class EmbeddingRequest(_Open):
    """``POST /openai/v1/embeddings``."""

    model: str = ModelName
    input: str | list[str] = Field(max_length=MAX_ITEMS)
    encoding_format: Literal["float", "base64"] = "float"


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "vramancer"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIEmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: dict[str, int]


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError


# -- Ollama ---------------------------------------------------------------------------------------


class OllamaErrorResponse(BaseModel):
    """An error of the Ollama surface: Ollama's own ``{"error": "..."}``, or VRAMancer's error
    object for a request refused before it reaches the gateway (token, size, rate, standby)."""

    error: str | ErrorDetail


class GenerateRequest(_Open):
    """``POST /ollama/api/generate``: without a prompt it only loads the model."""

    model: str = ModelName
    prompt: str | None = None
    stream: bool = True


class ChatRequest(_Open):
    """``POST /ollama/api/chat``: without messages it only loads the model."""

    model: str = ModelName
    messages: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_ITEMS)
    stream: bool = True


class EmbedRequest(_Open):
    """``POST /ollama/api/embed``."""

    model: str = ModelName
    input: str | list[str] = Field(max_length=MAX_ITEMS)


class ShowRequest(_Open):
    """``POST /ollama/api/show`` (older clients send ``name``)."""

    model: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)
    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)


class OllamaDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str = ""
    quantization_level: str = ""


class OllamaTag(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaDetails


class OllamaTags(BaseModel):
    models: list[OllamaTag]


class OllamaRunning(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: OllamaDetails
    expires_at: str
    size_vram: int


class OllamaPs(BaseModel):
    models: list[OllamaRunning]


class OllamaVersion(BaseModel):
    #: The Ollama API version the surface follows (clients check it).
    version: str
    vramancer: str


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaShow(BaseModel):
    model_config = ConfigDict(extra="allow")

    modelfile: str
    parameters: str
    template: str
    details: OllamaDetails
    model_info: dict[str, Any]
    capabilities: list[str]


# -- answers relayed from a model's server (their fields as the server sends them) ---------------


class ChatCompletion(_Open):
    """An OpenAI chat completion (streamed: ``chat.completion.chunk`` events)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[dict[str, Any]]


class Completion(ChatCompletion):
    """An OpenAI text completion."""


class OllamaAnswer(_Open):
    """An Ollama answer, or one line of a streamed one (the last has ``"done": true``)."""

    model: str
    created_at: str
    done: bool
    response: str | None = None
    message: dict[str, Any] | None = None
    done_reason: str | None = None
