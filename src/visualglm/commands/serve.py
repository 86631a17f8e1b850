"""``visualglm serve``: the HTTP API (original ``POST /`` + OpenAI-compatible) with continuous batching."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..image import DEFAULT_MAX_PIXELS
from .common import add_model_args, load_from_args


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface)")
    g.add_argument("--port", type=int, default=8080)
    g.add_argument("--api-key", default=os.environ.get("VISUALGLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $VISUALGLM_API_KEY, else no key)")
    g.add_argument("--model-name", default=None, help="name reported by /v1/models (default: folder name)")
    g.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (KV slots)")
    g.add_argument("--max-prefill-tokens", type=int, default=8192,
                   help="padded prompt tokens prefilled in one admission round")
    g.add_argument("--max-waiting", type=int, default=1024, help="queued requests before answering 503")
    g.add_argument("--max-body-bytes", type=int, default=20 * 1024 * 1024, help="largest request body")
    g.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest image (width x height) accepted")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="let requests name http(s) image URLs that the server downloads")
    g.add_argument("--lang", default="auto", choices=["auto", "zh", "en"],
                   help="prompt form when a request does not say: auto = en when the query has no CJK")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..distributed.lockstep import lead
    from ..serving.server import ServerSettings, create_app

    model, tok = load_from_args(args)
    if not lead(model):  # torchrun: ranks > 0 replay rank 0's model calls, then end here
        return 0
    name = args.model_name or (Path(args.model).name if args.model else "visualglm-demo")
    settings = ServerSettings(model_name=name, api_key=args.api_key, max_batch_size=args.max_batch_size,
                              max_prefill_tokens=args.max_prefill_tokens, max_waiting=args.max_waiting,
                              max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
                              allow_remote_images=args.allow_remote_images, lang=args.lang)
    app = create_app(model, tok, settings)
    print(f"serving {name} on http://{args.host}:{args.port} (OpenAI base URL: http://{args.host}:{args.port}/v1)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
