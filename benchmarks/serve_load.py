"""Load test of ``visualglm serve``: requests/s, tokens/s, p50/p99 latency at 1, 4, 16 and 32 clients.

Each client sends its requests one after another (closed loop) to ``/v1/chat/completions``; all clients of
a level start together. Continuous batching should make token throughput grow with the number of clients;
the 16-vs-1 ratio is printed at the end, with the average number of sequences per decode step (from
``/health``) to show the batching itself.

    # against a server it starts (a loopback port, the tiny fixture model on CPU):
    python benchmarks/serve_load.py --model ../shared/reference/tiny-visualglm-hf --device cpu --dtype float32
    # against a running server:
    python benchmarks/serve_load.py --url http://127.0.0.1:8080 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["Hello, who are you?", "Tell me about yourself.", "What can you do?", "Hi there, who are you?"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server; without it one is started (needs --model)")
    ap.add_argument("--model", default=None, help="checkpoint for the server this script starts")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--max-batch-size", type=int, default=32, help="for the started server")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", default="1,4,16,32", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--image", default=None, help="attach this image to every request")
    ap.add_argument("--json-out", default=None, help="also write the results here")
    return ap.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "visualglm", "serve", "--model", args.model, "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--log-level", "warning"]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    cmd += ["--api-key", args.api_key] if args.api_key else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up within 300 s")


def request_body(i: int, args: argparse.Namespace, image_url: str | None) -> dict:
    text = PROMPTS[i % len(PROMPTS)]
    content: str | list = text
    if image_url:
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image_url}}]
    return {"model": "bench", "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens, "temperature": args.temperature}


async def run_level(url: str, clients: int, args: argparse.Namespace, image_url: str | None) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    latencies: list[float] = []
    tokens = 0
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        before = (await http.get("/health")).json()

        async def client(c: int) -> None:
            nonlocal tokens
            for r in range(args.requests):
                t0 = time.perf_counter()
                resp = await http.post("/v1/chat/completions", json=request_body(c + r, args, image_url))
                resp.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tokens += resp.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - start
        after = (await http.get("/health")).json()
    steps = after["steps"] - before["steps"]
    rows = after["step_rows"] - before["step_rows"]
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "tokens": tokens, "wall_s": wall,
            "requests_per_s": len(lat) / wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
            "avg_batch": rows / steps if steps else 0.0}


async def main_async(args: argparse.Namespace, url: str) -> list[dict]:
    image_url = None
    if args.image:
        data = Path(args.image).read_bytes()
        image_url = "data:image/png;base64," + base64.b64encode(data).decode()
    warm = argparse.Namespace(**{**vars(args), "requests": 1})
    await run_level(url, 1, warm, image_url)  # warm-up, not reported
    results = []
    for clients in (int(c) for c in args.clients.split(",")):
        res = await run_level(url, clients, args, image_url)
        results.append(res)
        print(f"{res['clients']:>7} {res['requests']:>8} {res['tokens']:>7} {res['requests_per_s']:>9.2f} "
              f"{res['tokens_per_s']:>9.1f} {res['p50_s']:>8.3f} {res['p99_s']:>8.3f} {res['avg_batch']:>9.2f}",
              flush=True)
    return results


def main() -> int:
    args = parse_args()
    if args.url is None and args.model is None:
        raise SystemExit("give --url of a running server, or --model to start one")
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        print(f"server {url}; {args.requests} requests/client, max_tokens {args.max_tokens}, "
              f"temperature {args.temperature}, image {'yes' if args.image else 'no'}; {os.cpu_count()} cpus, "
              f"load average {os.getloadavg()[0]:.1f} at start")
        print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'req/s':>9} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8} "
              f"{'avg batch':>9}")
        results = asyncio.run(main_async(args, url))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    by = {r["clients"]: r for r in results}
    if 1 in by and 16 in by:
        print(f"token throughput 16 clients / 1 client: {by[16]['tokens_per_s'] / by[1]['tokens_per_s']:.2f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
