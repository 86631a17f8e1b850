"""Wire types of the HTTP API: OpenAI chat completions (with ``image_url`` parts) and the original ``POST /``.

Requests are validated strictly (``"0.5"`` is not a number, unknown fields are refused) because a silently
coerced or ignored field is a wrong answer the client cannot see; every violation becomes a 400 in OpenAI's
error shape. Fields that OpenAI defines but VisualGLM cannot honour are accepted at their neutral value
and refused otherwise (``n=2``, ``logprobs=true``, tools, ...).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_STRICT = ConfigDict(strict=True, extra="forbid")


class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """Pydantic's error list -> one readable 400 naming the first offending field."""
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("tagged-union", "list[")))
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {loc}", param=loc,
                        code="unknown_parameter")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r:.80})"
    return APIError(400, f"invalid value for '{loc or 'body'}': {first['msg']}{shown}", param=loc or None,
                    code="invalid_type" if first["type"].endswith("_type") else "invalid_value")


# ----- OpenAI chat completions: request ------------------------------------------------------------------
class ImageURL(BaseModel):
    model_config = _STRICT
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model always sees 224x224


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL | str  # the object form, or a bare URL string

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    def images(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [p.url for p in self.content if isinstance(p, ImagePart)]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and ignored


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. ``top_k``, ``repetition_penalty`` and ``lang`` are our extra fields."""

    model_config = _STRICT
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    lang: Literal["auto", "zh", "en"] | None = None
    # OpenAI fields accepted at their neutral values only (checked in unsupported()).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    # OpenAI bookkeeping fields, accepted and ignored.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def new_token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> str | None:
        """The first requested feature VisualGLM cannot provide, as ``param``; None if all is well."""
        neutral = {
            "n": self.n == 1, "presence_penalty": not self.presence_penalty,
            "frequency_penalty": not self.frequency_penalty, "logit_bias": not self.logit_bias,
            "logprobs": not self.logprobs, "top_logprobs": not self.top_logprobs, "tools": not self.tools,
            "tool_choice": self.tool_choice in (None, "none"), "functions": not self.functions,
            "function_call": self.function_call in (None, "none"),
            "response_format": self.response_format is None or self.response_format.get("type") == "text",
            "modalities": self.modalities in (None, ["text"]),
            "stop": len(self.stops()) <= 4 and all(self.stops()),
        }
        return next((name for name, ok in neutral.items() if not ok), None)


# ----- OpenAI chat completions: responses -------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, created: int, delta: dict[str, str] | None, finish_reason: str | None = None,
          usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` gives the usage-only chunk (empty ``choices``)."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": []}
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    if usage_ is not None:
        body["usage"] = usage_
    return body


def model_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "visualglm"}]}


# ----- the original VisualGLM-6B api.py contract ------------------------------------------------------------
class LegacyRequest(BaseModel):
    """``POST /``: the original's ``{"image": base64, "text", "history"}`` plus optional sampling knobs.

    Unknown keys are ignored, as the original did; known keys must have the right type.
    """

    model_config = ConfigDict(strict=True, extra="ignore")
    text: str
    image: str | None = None
    history: list[tuple[str, str]] | None = None
    max_length: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    lang: Literal["auto", "zh", "en"] | None = None
