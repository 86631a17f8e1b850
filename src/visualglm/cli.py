"""``visualglm`` command line: one table of subcommands, each imported only when it runs.

A subcommand module defines ``configure(parser)`` (its flags) and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("visualglm.commands.chat", "chat about an image in the terminal (or answer once with --prompt)"),
    "convert": ("visualglm.commands.convert", "convert a sat/HF checkpoint into a self-contained folder"),
    "serve": ("visualglm.commands.serve", "HTTP API: the original POST / and OpenAI-compatible /v1 (batched)"),
    "web": ("visualglm.commands.web", "Gradio web demo: upload an image and chat"),
    "finetune": ("visualglm.commands.finetune", "fine-tune with LoRA, QLoRA, P-tuning v2 or fully (torchrun too)"),
    "merge-lora": ("visualglm.commands.merge_lora", "merge a LoRA adapter into its base: a standalone checkpoint"),
    "bench": ("visualglm.commands.bench", "decode speed vs the memory-bandwidth limit, prefill, memory"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="visualglm", description="VisualGLM-6B: chat, serve, fine-tune.")
    top.add_argument("--version", action="store_true", help="print the version and exit")
    subs = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subs.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        args = top.parse_args(argv)
        if args.version:
            from . import __version__
            print(__version__)
            return 0
        top.print_help()
        return 0 if not argv else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"visualglm {name}", description=COMMANDS[name][1])
    module.configure(parser)
    return int(module.run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
