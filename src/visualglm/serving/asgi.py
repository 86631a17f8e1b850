"""Small ASGI pieces the API needs: a body-size limit, SSE that notices hang-ups, a background uvicorn."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

DRAIN_FACTOR = 4  # read (and drop) bodies up to this many times the limit before answering 413


async def wait_disconnect(receive: Callable) -> None:
    """Return when the client hangs up (call only after the request body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not Content-Length is sent.

    ``error_body(message)`` renders the JSON error (OpenAI's shape for this server).
    """

    def __init__(self, app: Any, max_bytes: int, error_body: Callable[[str], dict]) -> None:
        self.app, self.max_bytes, self.error_body = app, max_bytes, error_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            elif size > DRAIN_FACTOR * self.max_bytes or not more:
                # A moderately oversized body is read to its end so the client sees the 413 rather than a
                # reset connection; beyond that, answer at once and close.
                return await self._refuse(send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes

        await self.app(scope, replay, send)

    async def _refuse(self, send: Callable) -> None:
        body = json.dumps(self.error_body(f"request body larger than max_body_bytes={self.max_bytes}")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class SSEResponse(Response):
    """Server-sent events that notice a client hanging up at once, not only at the next write; leaving
    closes ``events``, so its ``finally`` can abort the work behind it."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(media_type="text/event-stream")
        self.events = events

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        stream = asyncio.ensure_future(self._stream(send))
        gone = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({stream, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, gone):
                task.cancel()
            await asyncio.gather(stream, gone, return_exceptions=True)
            await self.events.aclose()

    async def _stream(self, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class BackgroundServer:
    """uvicorn on a pre-bound loopback socket in a thread (tests, benchmarks). Connections made before it
    is ready wait in the socket's backlog, so no start-up polling is needed."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(256)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
