"""``visualglm chat``: the original's terminal demo, plus one-shot answers for scripts (--prompt, --json).

The loop follows the original ``cli_demo.py``: ask for an image path (or URL with --allow-remote-images;
empty = text only), describe the image first, then chat; ``clear`` starts over with a new image, ``stop`` or
Ctrl-D quits. Ctrl-C stops the answer being printed (keeping what was said in the history), never the
program. Answers appear token by token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
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
        with CTRL_C.allowed():
            for shown_now, new_history in stream:
                if not args.json:
                    out.write(shown_now[len(shown):] if shown_now.startswith(shown) else "\n" + shown_now)
                    out.flush()
                shown = shown_now
    except KeyboardInterrupt:
        stream.close()  # frees the engine slot; a second Ctrl-C meanwhile waits (see CtrlC)
        new_history = history + [(query, shown)]
        if not args.json:
            out.write(" [interrupted]")
        CTRL_C.pending = False  # more presses during the clean-up meant this same interruption
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
    with CTRL_C.installed():  # after loading: Ctrl-C while loading still ends the program
        if args.prompt is not None:
            try:
                answer(model, tok, args, args.image, args.prompt, [])
            except (ImageError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            return 0
        return interactive(model, tok, args)


class CtrlC:
    """Ctrl-C raises KeyboardInterrupt only inside ``allowed()`` blocks: reading a line, streaming an answer.

    Python raises KeyboardInterrupt at whatever bytecode runs when SIGINT arrives. Landing in the chat's
    own bookkeeping (between a read line and its answer, in the clean-up of an interrupted answer, e.g. on
    a double press) it would escape every handler and end the chat. Outside the blocks a press is kept
    and raised as the next block starts, so it still stops what comes next.
    """

    def __init__(self) -> None:
        self.inside = False
        self.pending = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.inside:
            raise KeyboardInterrupt
        self.pending = True

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        self.inside = True
        try:
            if self.pending:
                self.pending = False
                raise KeyboardInterrupt
            yield
        finally:
            self.inside = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT for the block, in place of Python's default handler only (one set to ignore it,
        e.g. by nohup, or an embedding program's own, stays; so does any outside the main thread)."""
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield
            return
        previous = signal.signal(signal.SIGINT, self)
        self.pending = False
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


CTRL_C = CtrlC()


class _Quit(Exception):
    """'stop' or Ctrl-D."""


def ask(prompt: str, quiet: bool = False) -> str:
    """input() where Ctrl-C only clears the line (like a shell) and Ctrl-D quits. ``quiet`` (--json) puts
    the prompt on stderr so stdout holds only JSON lines."""
    while True:
        try:
            with CTRL_C.allowed():
                return read_line(prompt, sys.stderr if quiet else sys.stdout).strip()
        except KeyboardInterrupt:
            print()
        except EOFError:
            print()
            raise _Quit from None


def read_line(prompt: str, out: TextIO) -> str:
    """input() whose wait for a terminal line always ends on Ctrl-C.

    input() blocks in read(2) and counts on SIGINT interrupting it (EINTR). A SIGINT that lands after the
    prompt is written but before read(2) starts only marks the signal pending in Python: read(2) then waits
    for the next Enter and the Ctrl-C looks ignored. The window is real: writing the prompt wakes whoever
    watches the screen, who may run (and press Ctrl-C) before this process reaches read(2). The same
    happens if the kernel hands SIGINT to another thread (torch's). Here the wait is a select() on stdin
    and on a pipe that Python's C-level handler writes to (``signal.set_wakeup_fd``), so a SIGINT at any
    moment ends the wait and its Python handler runs. Terminals only: other input (pipes, tests' StringIO)
    goes through input().
    """
    fd = _terminal_fd()
    if fd is None:
        out.write(prompt)
        out.flush()
        return input()
    wake = _wakeup_pipe()
    previous = signal.set_wakeup_fd(wake[1], warn_on_full_buffer=False)
    try:
        out.write(prompt)
        out.flush()
        line = bytearray()
        while not line.endswith(b"\n"):
            ready = select.select([fd, wake[0]], [], [])[0]
            if wake[0] in ready:
                _drain(wake[0])  # only a wake-up: the handler itself runs as this function goes on
            if fd in ready:
                byte = os.read(fd, 1)  # a byte at a time, as input() does: never read past the line
                if not byte:  # Ctrl-D
                    if not line:
                        raise EOFError
                    break
                line += byte
    finally:
        signal.set_wakeup_fd(previous)
    encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
    return line.decode(encoding, "replace").removesuffix("\n")


def _terminal_fd() -> int | None:
    """stdin's descriptor when it is a terminal and this is the main thread (set_wakeup_fd needs it)."""
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and ValueError
        return None
    return fd if os.isatty(fd) else None


_WAKE: tuple[int, int] | None = None


def _wakeup_pipe() -> tuple[int, int]:
    """(read end, write end), non-blocking, made once and kept for the process."""
    global _WAKE
    if _WAKE is None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        _WAKE = (r, w)
    return _WAKE


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


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
