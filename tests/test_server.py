"""The HTTP API on a real uvicorn (loopback, random port), driven by the official openai client and httpx.

Uses the tiny reference model (nonsense text, but deterministic), so greedy answers can be compared exactly
with ``model.chat`` and with the same requests sent one at a time.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import threading
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from visualglm.serving.server import BackgroundServer, ServerSettings, create_app

KEY = "test-key"
CONTEXT = 512  # the tiny model's max_sequence_length


@pytest.fixture(scope="module")
def image_bytes(reference_dir) -> bytes:
    return (reference_dir / "chelsea.png").read_bytes()


@pytest.fixture(scope="module")
def data_url(image_bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image_bytes).decode()


@pytest.fixture(scope="module")
def server(reference_model):
    model, tok = reference_model
    settings = ServerSettings(model_name="tiny", api_key=KEY, max_batch_size=8, max_body_bytes=2_000_000,
                              max_image_pixels=400 * 400)
    app = create_app(model, tok, settings)
    with BackgroundServer(app) as srv:
        srv.worker = app.state.worker
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def user(text: str, image: str | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": image}}]}


def library_answer(reference_model, image, query, history=(), *, english, max_new_tokens=None, **kw) -> str:
    model, tok = reference_model
    return model.chat(tok, image, query, list(history), english=english, temperature=0, max_length=CONTEXT,
                      max_new_tokens=max_new_tokens, **kw)[0]


# ----- basics ---------------------------------------------------------------------------------------------
def test_models_health_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()  # no key needed: load balancers probe it
    assert health["status"] == "ok" and health["max_batch_size"] == 8
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(server.url + "/v1/chat/completions", headers=headers,
                       json={"messages": [user("hi")]})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=[user("hi")])


# ----- answers equal the library's ------------------------------------------------------------------------
CASES = [  # (query, with image, english prompt form, max_tokens)
    ("描述这张图片。", True, False, 24),
    ("Describe the image.", True, True, 24),
    ("Hello, who are you?", False, True, 30),
    ("你好", False, False, 24),
]


@pytest.mark.parametrize("query,with_image,english,max_tokens", CASES)
def test_greedy_matches_model_chat(client, reference_model, reference_dir, data_url, query, with_image, english,
                                   max_tokens):
    image = str(reference_dir / "chelsea.png") if with_image else None
    expected = library_answer(reference_model, image, query, english=english, max_new_tokens=max_tokens)
    messages = [user(query, data_url if with_image else None)]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=max_tokens)
    assert r.choices[0].message.content == expected
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=max_tokens,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_history_system_message_and_language(client, reference_model):
    history = [("你好", "你好！有什么可以帮你？")]
    expected = library_answer(reference_model, None, "Tell me more.", history, english=True, max_new_tokens=20)
    messages = [{"role": "user", "content": history[0][0]}, {"role": "assistant", "content": history[0][1]},
                user("Tell me more.")]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20)
    assert r.choices[0].message.content == expected
    # lang=zh forces the Chinese prompt form for an English query (extra field, like top_k)
    zh = library_answer(reference_model, None, "Tell me more.", history, english=False, max_new_tokens=20)
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20,
                                       extra_body={"lang": "zh"})
    assert r.choices[0].message.content == zh
    # a system message is put before the first user turn
    sys_expected = library_answer(reference_model, None, "Be brief.\nHello", english=True, max_new_tokens=12)
    r = client.chat.completions.create(model="tiny", temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": "Be brief."}, user("Hello")])
    assert r.choices[0].message.content == sys_expected


def test_legacy_contract(server, reference_model, reference_dir, image_bytes):
    model, tok = reference_model
    image = str(reference_dir / "chelsea.png")
    body = {"image": base64.b64encode(image_bytes).decode(), "text": "描述这张图片。", "history": [],
            "temperature": 0, "max_length": 100}
    r = httpx.post(server.url + "/", json=body, headers=auth(), timeout=60)
    assert r.status_code == 200
    out = r.json()
    expected, hist = model.chat(tok, image, "描述这张图片。", [], temperature=0, max_length=100)
    assert out["response"] == out["result"] == expected
    assert out["history"] == [list(t) for t in hist] and out["status"] == 200 and len(out["time"]) == 19
    # second turn with the returned history
    body2 = {**body, "text": "这是什么动物？", "history": out["history"]}
    out2 = httpx.post(server.url + "/", json=body2, headers=auth(), timeout=60).json()
    assert out2["response"] == model.chat(tok, image, "这是什么动物？", hist, temperature=0, max_length=100)[0]


def test_stop_length_and_seed(client):
    base = {"model": "tiny", "messages": [user("Hello, who are you?")], "temperature": 0, "max_tokens": 12}
    r = client.chat.completions.create(**base)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    full = r.choices[0].message.content
    stop = next(w for w in full.split() if full.index(w) > 0)  # a word after the start of the answer
    cut = client.chat.completions.create(**base, stop=["never appears", stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.usage.completion_tokens < 12
    streamed = client.chat.completions.create(**base, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]
    sampled = {**base, "temperature": 1.0, "top_p": 1.0, "seed": 1234, "extra_body": {"top_k": 0}}
    a = client.chat.completions.create(**sampled).choices[0].message.content
    b = client.chat.completions.create(**sampled).choices[0].message.content
    assert a == b


# ----- continuous batching --------------------------------------------------------------------------------
def test_32_concurrent_clients_match_one_at_a_time(server, client, data_url):
    queries = ["描述这张图片。", "Describe the image.", "Hello, who are you?", "你好", "What is this?",
               "图中有什么？", "Write a poem about the sea.", "Tell me a story"]
    requests = [{"messages": [user(q, data_url if i % 3 == 0 else None)], "temperature": 0,
                 "max_tokens": 8 + (i * 5) % 20} for i, q in enumerate(queries * 4)]
    alone = [client.chat.completions.create(model="tiny", **r).choices[0].message.content for r in requests]
    before = server.worker.stats()

    async def together() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        async with aclient:
            async def one(i: int, r: dict) -> str:
                if i % 2:  # half of them stream
                    s = await aclient.chat.completions.create(model="tiny", stream=True, **r)
                    return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
                return (await aclient.chat.completions.create(model="tiny", **r)).choices[0].message.content
            return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

    assert asyncio.run(together()) == alone
    after = server.worker.stats()
    steps, rows = after["steps"] - before["steps"], after["step_rows"] - before["step_rows"]
    assert after["peak_running"] > 1 and rows > steps  # decode steps were shared between requests
    assert after["running"] == after["waiting"] == 0


# ----- bad inputs: the right error, never a crash ---------------------------------------------------------
def png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def bad_requests(data_url: str, image_path: str) -> list[tuple[str, object, int, str]]:
    b64 = base64.b64encode
    big = "data:image/png;base64," + b64(png_bytes((500, 500))).decode()  # 250k > 160k pixels
    text_b64 = "data:image/png;base64," + b64(b"just some text, not an image").decode()
    img = lambda url: {"type": "image_url", "image_url": url}  # noqa: E731
    ok = [user("hi")]
    return [
        ("bad base64", {"messages": [{"role": "user", "content": [img("data:image/png;base64,@@not b64@@")]}]},
         400, "invalid_image"),
        ("not an image", {"messages": [{"role": "user", "content": [img(text_b64)]}]}, 400, "invalid_image"),
        ("too many pixels", {"messages": [{"role": "user", "content": [img(big)]}]}, 400, "invalid_image"),
        ("local path", {"messages": [{"role": "user", "content": [img(image_path)]}]}, 400, "invalid_image"),
        ("file url", {"messages": [{"role": "user", "content": [img("file://" + image_path)]}]}, 400,
         "invalid_image"),
        ("remote url disabled", {"messages": [{"role": "user", "content": [img("http://127.0.0.1:1/x.png")]}]},
         400, "invalid_image"),
        ("two images", {"messages": [{"role": "user", "content": [img(data_url), img(data_url)]}]}, 400,
         "too_many_images"),
        ("two images in two turns", {"messages": [
            {"role": "user", "content": [img(data_url)]}, {"role": "assistant", "content": "a cat"},
            {"role": "user", "content": [{"type": "text", "text": "and this?"}, img(data_url)]}]}, 400,
         "too_many_images"),
        ("string temperature", {"messages": ok, "temperature": "0.5"}, 400, "invalid_type"),
        ("string messages", {"messages": "hi"}, 400, "invalid_type"),
        ("content number", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
        ("unknown part type", {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, 400,
         None),
        ("unknown field", {"messages": ok, "frobnicate": True}, 400, "unknown_parameter"),
        ("top_p out of range", {"messages": ok, "top_p": 1.5}, 400, "invalid_value"),
        ("negative max_tokens", {"messages": ok, "max_tokens": -1}, 400, "invalid_value"),
        ("n=2", {"messages": ok, "n": 2}, 400, "unsupported_parameter"),
        ("empty messages", {"messages": []}, 400, "invalid_value"),
        ("ends with assistant", {"messages": [user("hi"), {"role": "assistant", "content": "yo"}]}, 400, None),
        ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, 400, None),
        ("prompt too long", {"messages": [user("hello " * 600)]}, 400, "context_length_exceeded"),
        ("not json", b"{nope", 400, "invalid_json"),
    ]


def test_bad_inputs_get_openai_errors(server, client, data_url, reference_dir):
    image_path = str((reference_dir / "chelsea.png").resolve())
    for name, body, status, code in bad_requests(data_url, image_path):
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.url + "/v1/chat/completions", headers=auth(), timeout=60, **kw)
        assert r.status_code == status, (name, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error", name
        if code is not None:
            assert err["code"] == code, (name, err)
    # the official client surfaces them as BadRequestError
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=[user("hello " * 600)])
    # the original contract validates too
    for body in ({"image": "@@", "text": "hi"}, {"history": []}, {"text": "hi", "history": "x"},
                 {"text": 3}, {"text": "hi", "max_length": "9"}):
        r = httpx.post(server.url + "/", json=body, headers=auth())
        assert r.status_code == 400 and "error" in r.json(), body
    # the server is still fine
    r = client.chat.completions.create(model="tiny", messages=[user("hi")], max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_body_limit(server):
    payload = {"messages": [user("x" * 2_100_000)]}
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth(), json=payload, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"y" * 100_000
        yield b'"}]}'

    r = httpx.post(server.url + "/v1/chat/completions", headers=auth(), content=chunks(), timeout=60)
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200


def test_engine_failure_is_an_error_not_a_crash(server, client):
    engine = server.worker.engine

    def broken_step():
        del engine.step  # fail once, then the real method again
        raise RuntimeError("simulated device failure")

    engine.step = broken_step
    with pytest.raises(openai.InternalServerError, match="simulated device failure"):
        client.chat.completions.create(model="tiny", messages=[user("Hello, who are you?")], max_tokens=10)
    assert server.worker.wait_until_idle(30)
    r = client.chat.completions.create(model="tiny", messages=[user("Hello, who are you?")], max_tokens=5)
    assert r.usage.completion_tokens == 5


# ----- disconnects free slots -------------------------------------------------------------------------------
def test_stream_disconnect_frees_slot(server):
    before = server.worker.stats()["aborted"]
    body = {"messages": [user("Hello, who are you?")], "temperature": 0, "max_tokens": 480, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=auth(),
                      timeout=60) as r:
        lines = r.iter_lines()
        events = [next(line for line in lines if line.startswith("data: ")) for _ in range(3)]
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    # the greedy answer runs to 480 tokens; the abort ends it long before
    assert server.worker.wait_until_idle(30)
    stats = server.worker.stats()
    assert stats["aborted"] == before + 1 and stats["running"] == 0


def test_non_stream_disconnect_frees_slot(server):
    before = server.worker.stats()["aborted"]
    body = {"messages": [user("Hello, who are you?")], "temperature": 0, "max_tokens": 480}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=0.3)
    assert server.worker.wait_until_idle(30)
    assert server.worker.stats()["aborted"] == before + 1


# ----- remote images, when allowed ------------------------------------------------------------------------
def test_remote_image_when_allowed(reference_model, reference_dir, data_url):
    """A second server with --allow-remote-images fetches from a loopback HTTP server."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(reference_dir))
    handler.log_message = lambda *a: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    model, tok = reference_model
    app = create_app(model, tok, ServerSettings(model_name="tiny", allow_remote_images=True, max_batch_size=2))
    try:
        with BackgroundServer(app) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            url = f"http://127.0.0.1:{files.server_address[1]}/chelsea.png"
            remote = c.chat.completions.create(model="tiny", messages=[user("描述这张图片。", url)],
                                               temperature=0, max_tokens=10)
            inline = c.chat.completions.create(model="tiny", messages=[user("描述这张图片。", data_url)],
                                               temperature=0, max_tokens=10)
            assert remote.choices[0].message.content == inline.choices[0].message.content
            with pytest.raises(openai.BadRequestError, match="invalid image"):
                c.chat.completions.create(model="tiny", messages=[user("x", url + ".missing")], max_tokens=2)
    finally:
        files.shutdown()


# ----- the shipped demo model ----------------------------------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"  # purple circle, orange square, green triangle


def test_default_model_answers_about_the_example_image():
    """No path: the demo model shipped in the package, served over both APIs, sees the README's image."""
    import visualglm

    model, tok = visualglm.load(device="cpu")
    assert model.config.name == "visualglm-demo"
    image = base64.b64encode(EXAMPLE.read_bytes()).decode()
    app = create_app(model, tok, ServerSettings(max_batch_size=2))
    with BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="visualglm-demo", temperature=0, messages=[
            user("What color is the circle?", "data:image/png;base64," + image)])
        assert "purple" in r.choices[0].message.content
        r = httpx.post(srv.url + "/", timeout=120, json={"image": image, "text": "三角形是什么颜色的？", "history": [],
                                                          "temperature": 0})
        assert r.status_code == 200 and "绿" in r.json()["response"], r.json()


# ----- the command ------------------------------------------------------------------------------------------
def test_serve_command(reference_dir, data_url):
    """``visualglm serve`` as a user starts it: flags reach the server, Ctrl-C stops it cleanly."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "visualglm", "serve", "--model", str(reference_dir / "tiny-visualglm-hf"),
           "--device", "cpu", "--dtype", "float32", "--port", str(port), "--api-key", "k",
           "--model-name", "my-tiny", "--max-batch-size", "4", "--max-image-pixels", "100"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:  # uvicorn logs to stderr; block until it listens
            if "Uvicorn running on" in line:
                break
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["my-tiny"]
        r = c.chat.completions.create(model="my-tiny", messages=[user("你好")], max_tokens=4)
        assert r.model == "my-tiny" and r.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="max_pixels=100"):
            c.chat.completions.create(model="my-tiny", messages=[user("hi", data_url)], max_tokens=2)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["max_batch_size"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
