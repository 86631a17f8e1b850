"""``visualglm chat``: the original's terminal demo, plus one-shot answers for scripts (--prompt, --json).

The loop follows the original ``cli_demo.py``: ask for an image path (or URL with --allow-remote-images;
empty = text only), describe the image first, then chat; ``clear`` starts over with a new image, ``stop`` or
Ctrl-D quits. Ctrl-C stops the answer being printed (keeping what was said in the history), never the
program. Answers appear token by token.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from ..prompt import has_cjk
from .common import add_model_args, load_from_args

WELCOME = ("VisualGLM chat. Give an image {what} (empty = text only), then ask. "
           "'clear' starts over, 'stop' or Ctrl-D quits, Ctrl-C interrupts an answer.")
FIRST_QUESTION = {"zh": "描述这张图片。", "en": "Describe the image."}  # the original's --prompt_zh/--prompt_en


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--image", default=None, help="image path (or URL with --allow-remote-images)")
    parser.add_argument("--prompt", default=None, help="answer this once and exit (for scripts)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per answer: {\"response\", \"history\"}")
    parser.add_argument("--lang", default="auto", choices=["auto", "zh", "en"],
                        help="prompt form: zh (问/答), en (Q/A; bans Chinese ids as the original's --english "
                             "did), auto = en when the query has no CJK character")
    parser.add_argument("--english", action="store_true", help="same as --lang en")
    parser.add_argument("--allow-remote-images", action="store_true", help="accept http(s) image URLs")
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-length", type=int, default=2048, help="limit on prompt + answer tokens")
    g.add_argument("--max-new-tokens", type=int, default=None, help="limit on answer tokens")
    g.add_argument("--top-p", type=float, default=0.4)
    g.add_argument("--top-k", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--repetition-penalty", type=float, default=1.2)
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_length": args.max_length, "max_new_tokens": args.max_new_tokens, "top_p": args.top_p,
            "top_k": args.top_k, "temperature": args.temperature,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed,
            "do_sample": args.temperature > 0}


def language(args: argparse.Namespace) -> str:
    return "en" if args.english else args.lang


def is_english(args: argparse.Namespace, query: str) -> bool:
    lang = language(args)
    return lang == "en" or (lang == "auto" and not has_cjk(query))


def answer(model: Any, tok: Any, args: argparse.Namespace, image: Any, query: str, history: list,
           out: TextIO | None = None) -> tuple[str, list]:
    """Stream one answer (or print it as JSON); Ctrl-C stops it and keeps what was said so far."""
    out = out or sys.stdout
    shown, new_history = "", history + [(query, "")]
    stream = model.stream_chat(tok, image, query, history, english=is_english(args, query),
                               image_kwargs={"allow_remote": args.allow_remote_images}, **sampling_kwargs(args))
    try:
        for shown_now, new_history in stream:
            if not args.json:
                out.write(shown_now[len(shown):] if shown_now.startswith(shown) else "\n" + shown_now)
                out.flush()
            shown = shown_now
    except KeyboardInterrupt:
        stream.close()  # frees the engine slot
        new_history = history + [(query, shown)]
        if not args.json:
            out.write(" [interrupted]")
    if args.json:
        out.write(json.dumps({"response": shown, "history": new_history}, ensure_ascii=False) + "\n")
    else:
        out.write("\n")
    out.flush()
    return shown, new_history


def run(args: argparse.Namespace) -> int:
    from ..distributed.lockstep import lead
    from ..image import ImageError

    model, tok = load_from_args(args)
    if not lead(model):  # torchrun: ranks > 0 replay rank 0's model calls, then end here
        return 0
    if args.prompt is not None:
        try:
            answer(model, tok, args, args.image, args.prompt, [])
        except (ImageError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return interactive(model, tok, args)


class _Quit(Exception):
    """'stop' or Ctrl-D."""


def ask(prompt: str, quiet: bool = False) -> str:
    """input() where Ctrl-C only clears the line (like a shell) and Ctrl-D quits. ``quiet`` (--json) puts
    the prompt on stderr so stdout holds only JSON lines."""
    while True:
        try:
            if quiet:
                sys.stderr.write(prompt)
                sys.stderr.flush()
            return input("" if quiet else prompt).strip()
        except KeyboardInterrupt:
            print()
        except EOFError:
            print()
            raise _Quit from None


def interactive(model: Any, tok: Any, args: argparse.Namespace) -> int:
    from ..image import ImageError

    what = "path or URL" if args.allow_remote_images else "path"
    if not args.json:
        print(WELCOME.format(what=what))
    image = args.image
    try:
        while True:  # one conversation per image
            if image is None:
                image = ask(f"image {what}> ", args.json) or None
            if image == "stop":
                return 0
            history: list = []
            query = FIRST_QUESTION["en" if language(args) == "en" else "zh"] if image else ""
            if query and not args.json:
                print(f"user> {query}")
            while True:
                while not query:
                    query = ask("user> ", args.json)
                if query == "stop":
                    return 0
                if query == "clear":
                    break
                if not args.json:
                    print("VisualGLM> ", end="", flush=True)
                try:
                    _, history = answer(model, tok, args, image, query, history)
                except ImageError as e:
                    print(f"error: {e}", file=sys.stderr)
                    break  # ask for another image
                except ValueError as e:  # e.g. the history outgrew max_length
                    print(f"error: {e}", file=sys.stderr)
                query = ""
            image = None
    except _Quit:
        return 0
