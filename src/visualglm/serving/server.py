"""HTTP API: the original ``POST /`` contract, OpenAI-compatible ``/v1/chat/completions``, ``/v1/models``,
``/health``. Every request goes through the one :class:`EngineWorker`, so concurrent requests share forward
passes (continuous batching). Errors use OpenAI's error JSON; none of them stops the server.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..generation.chat import make_engine, sampling_params
from ..generation.engine import PromptTooLongError, Request
from ..image import DEFAULT_MAX_PIXELS, ImageError, image_to_tensor
from ..prompt import build_prompt, has_cjk
from . import protocol as p
from .asgi import BackgroundServer, BodyLimit, SSEResponse, wait_disconnect
from .scheduler import QueueFullError, SchedulerConfig
from .worker import EngineWorker, Job, Update

__all__ = ["BackgroundServer", "ServerSettings", "Service", "create_app"]

log = logging.getLogger("visualglm.serving")


@dataclass
class ServerSettings:
    """Everything ``visualglm serve`` can set besides the model."""

    model_name: str = "visualglm-6b"
    api_key: str | None = None
    max_batch_size: int = 16
    max_prefill_tokens: int = 8192
    max_waiting: int = 1024
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    allow_remote_images: bool = False
    lang: str = "auto"  # auto | zh | en: the prompt form when a request does not say


def create_app(model: Any, tokenizer: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread (``app.state.worker``)."""
    service = Service(model, tokenizer, settings or ServerSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        yield
        await asyncio.to_thread(service.worker.stop)

    app = FastAPI(title="VisualGLM API", version="1", lifespan=lifespan)
    app.state.worker, app.state.settings = service.worker, service.settings
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes,
                       error_body=lambda m: p.APIError(413, m, code="body_too_large").body())
    app.add_exception_handler(p.APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.get("/health")(service.health)
    app.get("/v1/models")(service.models)
    app.post("/v1/chat/completions")(service.chat_completions)
    app.post("/")(service.legacy)
    return app


class Service:
    """What the routes do: authorise, validate, build the prompt, queue on the worker, answer."""

    def __init__(self, model: Any, tokenizer: Any, settings: ServerSettings) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.engine = make_engine(model, tokenizer, settings.max_batch_size)  # --compile travels on the model
        self.worker = EngineWorker(self.engine, tokenizer, SchedulerConfig(
            settings.max_batch_size, settings.max_prefill_tokens, settings.max_waiting))
        self.started = int(time.time())

    # ----- routes ---------------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """Liveness and load; open without a key so load balancers can probe it."""
        return {"status": "ok", "model": self.settings.model_name, **self.worker.stats()}

    async def models(self, request: HTTPRequest) -> dict[str, Any]:
        self.authorize(request)
        return p.model_list(self.settings.model_name, self.started)

    async def chat_completions(self, request: HTTPRequest) -> Any:
        self.authorize(request)
        req = _parse(p.ChatCompletionRequest, await request.body())
        if (param := req.unsupported()) is not None:
            raise p.APIError(400, f"'{param}' is not supported by this server with that value", param=param,
                             code="unsupported_parameter")
        query, history, image = conversation(req.messages)
        knobs = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                 "repetition_penalty": req.repetition_penalty, "seed": req.seed}
        job = await self.submit(query, history, image, req.lang, knobs, max_new_tokens=req.new_token_limit(),
                                stop=req.stops(), stream=req.stream)
        cid, name = p.completion_id(), self.settings.model_name
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return SSEResponse(_sse(job, self.worker, cid, name, usage))
        final = await self.final(request, job)
        return p.completion(cid, name, final.text, final.finish_reason or "stop", job.prompt_tokens,
                            final.completion_tokens)

    async def legacy(self, request: HTTPRequest) -> dict[str, Any]:
        """The original VisualGLM-6B ``api.py``: {"image": base64, "text", "history"} -> {"result", ...}."""
        self.authorize(request)
        req = _parse(p.LegacyRequest, await request.body())
        history = [tuple(t) for t in req.history or []]
        knobs = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                 "repetition_penalty": req.repetition_penalty, "seed": req.seed}
        job = await self.submit(req.text, history, req.image, req.lang, knobs, max_length=req.max_length,
                                stream=False, param="image")
        final = await self.final(request, job)
        return {"response": final.text, "result": final.text,
                "history": [list(t) for t in history] + [[req.text, final.text]], "status": 200,
                "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}

    # ----- steps ----------------------------------------------------------------------------------------
    def authorize(self, request: HTTPRequest) -> None:
        key = self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise p.APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise p.APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def submit(self, query: str, history: list, image: str | None, lang: str | None,
                     knobs: dict[str, Any], *, max_length: int | None = None, max_new_tokens: int | None = None,
                     stop: tuple[str, ...] = (), stream: bool, param: str = "messages") -> Job:
        """Image -> pixels, prompt -> ids, knobs -> SamplingParams, validate, queue."""
        english = is_english(lang or self.settings.lang, query)
        pixels = None if image is None else await asyncio.to_thread(self.pixels, image, param)
        prompt = build_prompt(self.tokenizer, query, history, english=english, image=pixels is not None,
                              image_length=self.model.config.image_length)
        context = self.model.config.glm.max_sequence_length
        if len(prompt.input_ids) >= context:
            raise p.APIError(400, f"the prompt is {len(prompt.input_ids)} tokens, which leaves no room to answer "
                             f"in the model's context of {context} tokens; shorten the messages",
                             param="messages", code="context_length_exceeded")
        try:
            params = sampling_params(self.tokenizer, english=english, max_new_tokens=max_new_tokens, stop=stop,
                                     max_length=min(max_length or context, context),
                                     **{k: v for k, v in knobs.items() if v is not None})
            request = Request(prompt.input_ids, params, image=pixels, pre_image=prompt.pre_image)
            self.engine.validate(request)
        except PromptTooLongError as e:
            raise p.APIError(400, str(e), param="messages", code="context_length_exceeded") from e
        except ValueError as e:
            raise p.APIError(400, str(e), code="invalid_value") from e
        try:
            return self.worker.submit(request, english=english, stream=stream, loop=asyncio.get_running_loop())
        except QueueFullError as e:
            raise p.APIError(503, str(e), type="server_error", code="overloaded") from e
        except RuntimeError as e:  # shutting down
            raise p.APIError(503, str(e), type="server_error") from e

    def pixels(self, source: str, param: str) -> Any:
        """Untrusted image input -> (1, 3, 224, 224); never reads a local path, URLs only when allowed."""
        s = self.settings
        try:
            return image_to_tensor(source, size=self.model.config.vision.image_size, allow_local_files=False,
                                   allow_remote=s.allow_remote_images, max_pixels=s.max_image_pixels,
                                   max_bytes=s.max_body_bytes)
        except ImageError as e:
            raise p.APIError(400, f"invalid image: {e}", param=param, code="invalid_image") from e

    async def final(self, request: HTTPRequest, job: Job) -> Update:
        """Wait for the answer; a client that hangs up first aborts its request (frees the slot)."""
        getter = asyncio.ensure_future(_next_final(job))
        gone = asyncio.ensure_future(wait_disconnect(request.receive))
        try:
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not getter.done():
                getter.cancel()
                self.worker.abort(job)
        if getter.cancelled():
            raise p.APIError(499, "the client closed the request", code="client_closed")  # nobody reads it
        final = getter.result()
        if final.error is not None:
            raise p.APIError(500, f"generation failed: {type(final.error).__name__}: {final.error}",
                             type="server_error")
        return final


# ----- pure helpers -----------------------------------------------------------------------------------------
def is_english(lang: str, query: str) -> bool:
    """``auto`` picks the English prompt form (Q:/A:) when the query has no CJK character."""
    return lang == "en" or (lang == "auto" and not has_cjk(query))


def conversation(messages: list[p.Message]) -> tuple[str, list[tuple[str, str]], str | None]:
    """OpenAI messages -> (query, history pairs, the one image source or None).

    System/developer text is put before the first user turn (ChatGLM-6B has no system role); consecutive
    messages of one role are joined with newlines; the conversation must end with a user message.
    """
    system = "\n".join(m.text() for m in messages if m.role in ("system", "developer") and m.text())
    turns: list[list[str]] = []  # [role, text]
    images: list[str] = []
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        images += m.images()
        if turns and turns[-1][0] == m.role:
            turns[-1][1] += "\n" + m.text()
        else:
            turns.append([m.role, m.text()])
    if len(images) > 1:
        raise p.APIError(400, f"the conversation has {len(images)} images; VisualGLM takes one image per "
                         "conversation", param="messages", code="too_many_images")
    if not turns or turns[-1][0] != "user":
        raise p.APIError(400, "the last message must come from the user", param="messages")
    if turns[0][0] != "user":
        raise p.APIError(400, "the conversation must start with a user message (after system messages)",
                         param="messages")
    if system:
        turns[0][1] = system + "\n" + turns[0][1]
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return turns[-1][1], history, (images[0] if images else None)


def _parse(model_cls: type, body: bytes) -> Any:
    try:
        return model_cls.model_validate_json(body or b"null")
    except ValidationError as e:
        raise p.validation_error(e) from e


async def _next_final(job: Job) -> Update:
    while True:
        update = await job.queue.get()
        if update.done:
            return update


async def _sse(job: Job, worker: EngineWorker, cid: str, model: str, include_usage: bool
               ) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events, ending in ``data: [DONE]``; leaving early aborts the request."""
    created = int(time.time())
    try:
        yield _event(p.chunk(cid, model, created, {"role": "assistant", "content": ""}))
        while True:
            u: Update = await job.queue.get()
            if u.error is not None:
                yield _event(p.APIError(500, f"generation failed: {u.error}", type="server_error").body())
                break
            if u.delta:
                yield _event(p.chunk(cid, model, created, {"content": u.delta}))
            if u.done:
                yield _event(p.chunk(cid, model, created, {}, u.finish_reason))
                if include_usage:
                    yield _event(p.chunk(cid, model, created, None,
                                         usage_=p.usage(job.prompt_tokens, u.completion_tokens)))
                break
        yield "data: [DONE]\n\n"
    finally:
        worker.abort(job)  # no-op when it finished; frees the slot when the client left mid-stream


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# ----- error responses ----------------------------------------------------------------------------------------
async def _api_error(_: HTTPRequest, e: p.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(_: HTTPRequest, e: HTTPException) -> JSONResponse:
    """404 / 405 and friends, in the same error shape."""
    return JSONResponse(p.APIError(e.status_code, str(e.detail), code=str(e.status_code)).body(),
                        status_code=e.status_code, headers=getattr(e, "headers", None))


async def _internal_error(_: HTTPRequest, e: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return JSONResponse(p.APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                        status_code=500)
