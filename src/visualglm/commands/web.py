"""``visualglm web``: the Gradio demo (image upload, streamed chat, sampling sliders, language, Clear)."""

from __future__ import annotations

import argparse

from .common import add_model_args, load_from_args


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    g = parser.add_argument_group("web")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface)")
    g.add_argument("--port", type=int, default=7860)
    g.add_argument("--share", action="store_true", help="also publish a temporary public Gradio link")
    g.add_argument("--max-length", type=int, default=2048, help="starting value of the slider")
    g.add_argument("--top-p", type=float, default=0.4, help="starting value of the slider")
    g.add_argument("--temperature", type=float, default=0.8, help="starting value of the slider (0 = greedy)")
    g.add_argument("--lang", default="auto", choices=["auto", "zh", "en"], help="starting prompt language")


def run(args: argparse.Namespace) -> int:
    from ..web import build_demo, launch

    model, tok = load_from_args(args)
    demo = build_demo(model, tok, max_length=args.max_length, top_p=args.top_p, temperature=args.temperature,
                      lang=args.lang)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0
