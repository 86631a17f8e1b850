"""``visualglm chat``: the original's terminal demo, plus one-shot answers for scripts (--prompt, --json)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..prompt import has_cjk
from .common import add_model_args, load_from_args

WELCOME = ("VisualGLM chat. Give an image path (empty = text only), then ask. "
           "'clear' starts over, 'stop' or Ctrl-D quits, Ctrl-C interrupts an answer.")


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--image", default=None, help="image path (or URL with --allow-remote-images)")
    parser.add_argument("--prompt", default=None, help="answer this once and exit")
    parser.add_argument("--json", action="store_true", help="print one JSON object per answer")
    parser.add_argument("--lang", default="auto", choices=["auto", "zh", "en"],
                        help="prompt form: zh (问/答), en (Q/A), auto = en when the query has no CJK")
    parser.add_argument("--english", action="store_true", help="same as --lang en")
    parser.add_argument("--allow-remote-images", action="store_true", help="accept http(s) image URLs")
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-length", type=int, default=2048, help="limit on prompt + answer tokens")
    g.add_argument("--max-new-tokens", type=int, default=None, help="limit on answer tokens")
    g.add_argument("--top-p", type=float, default=0.4)
    g.add_argument("--top-k", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--repetition-penalty", type=float, default=1.2)
    g.add_argument("--seed", type=int, default=None)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_length": args.max_length, "max_new_tokens": args.max_new_tokens, "top_p": args.top_p,
            "top_k": args.top_k, "temperature": args.temperature,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed,
            "do_sample": args.temperature > 0}


def is_english(args: argparse.Namespace, query: str) -> bool:
    lang = "en" if args.english else args.lang
    return lang == "en" or (lang == "auto" and not has_cjk(query))


def answer(model: Any, tok: Any, args: argparse.Namespace, image: Any, query: str,
           history: list) -> tuple[str, list]:
    """Stream one answer to stdout (or print it as JSON); Ctrl-C stops it and keeps what was said."""
    shown, new_history = "", history
    image_kwargs = {"allow_remote": args.allow_remote_images}
    stream = model.stream_chat(tok, image, query, history, english=is_english(args, query),
                               image_kwargs=image_kwargs, **sampling_kwargs(args))
    try:
        for shown_now, new_history in stream:
            if not args.json:
                print(shown_now[len(shown):] if shown_now.startswith(shown) else "\n" + shown_now,
                      end="", flush=True)
            shown = shown_now
    except KeyboardInterrupt:
        stream.close()
        new_history = history + [(query, shown)]
        if not args.json:
            print(" [interrupted]", end="")
    if args.json:
        print(json.dumps({"response": shown, "history": new_history}, ensure_ascii=False), flush=True)
    else:
        print(flush=True)
    return shown, new_history


def run(args: argparse.Namespace) -> int:
    from ..image import ImageError

    model, tok = load_from_args(args)
    if args.prompt is not None:
        try:
            answer(model, tok, args, args.image, args.prompt, [])
        except (ImageError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    print(WELCOME)
    image, history = args.image, []
    ask_image = image is None
    while True:
        try:
            if ask_image:
                image = input("image path> ").strip() or None
                ask_image = False
            query = input("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query == "stop":
            return 0
        if query == "clear":
            history, ask_image = [], True
            continue
        if not query:
            continue
        if not args.json:
            print("VisualGLM> ", end="", flush=True)
        try:
            _, history = answer(model, tok, args, image, query, history)
        except (ImageError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            if isinstance(e, ImageError):
                image, ask_image = None, True
