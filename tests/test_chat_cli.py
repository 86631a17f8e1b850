"""``visualglm chat``: one-shot answers for scripts, the interactive loop, and Ctrl-C in a real terminal."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from visualglm import cli
from visualglm.commands import chat as chat_cmd


def model_flags(reference_dir) -> list[str]:
    return ["--model", str(reference_dir / "tiny-visualglm-hf"), "--device", "cpu", "--dtype", "float32"]


@pytest.fixture
def fixture_model(monkeypatch, reference_model):
    """Commands get the session's tiny reference model instead of loading it again."""
    monkeypatch.setattr(chat_cmd, "load_from_args", lambda args: reference_model)
    return reference_model


def run_cli(monkeypatch, capsys, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(["chat", "--model", "unused", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_one_shot_json_in_a_real_process(reference_dir, reference_model):
    """The installed entry point, as a script would call it."""
    model, tok = reference_model
    image = str(reference_dir / "chelsea.png")
    cmd = [sys.executable, "-m", "visualglm", "chat", *model_flags(reference_dir), "--image", image,
           "--prompt", "描述这张图片。", "--temperature", "0", "--max-new-tokens", "20", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    (result,) = json_lines(done.stdout)
    expected, history = model.chat(tok, image, "描述这张图片。", temperature=0, max_new_tokens=20)
    assert result == {"response": expected, "history": [list(t) for t in history]}


@pytest.mark.parametrize("lang,query,english", [("auto", "Hello, who are you?", True), ("auto", "你好", False),
                                                ("zh", "Hello, who are you?", False), ("en", "你好", True)])
def test_lang_picks_the_prompt_form(monkeypatch, capsys, fixture_model, lang, query, english):
    model, tok = fixture_model
    rc, out, _ = run_cli(monkeypatch, capsys, ["--prompt", query, "--lang", lang, "--temperature", "0",
                                               "--max-new-tokens", "16", "--json"])
    assert rc == 0
    expected = model.chat(tok, None, query, english=english, temperature=0, max_new_tokens=16)[0]
    assert json_lines(out)[0]["response"] == expected


def test_sampling_flags_reach_generation(monkeypatch, capsys, fixture_model):
    model, tok = fixture_model
    flags = ["--prompt", "Hello", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "50",
             "--repetition-penalty", "1.1", "--seed", "7", "--max-new-tokens", "12", "--json"]
    first = json_lines(run_cli(monkeypatch, capsys, flags)[1])[0]["response"]
    again = json_lines(run_cli(monkeypatch, capsys, flags)[1])[0]["response"]
    expected = model.chat(tok, None, "Hello", english=True, temperature=0.9, top_p=0.9, top_k=50,
                          repetition_penalty=1.1, seed=7, max_new_tokens=12)[0]
    assert first == again == expected


def test_interactive_loop(monkeypatch, capsys, fixture_model, reference_dir):
    """image -> automatic first question -> follow-up with history -> clear -> text only -> Ctrl-D."""
    model, tok = fixture_model
    image = str(reference_dir / "chelsea.png")
    stdin = f"{image}\n这是什么动物？\nclear\n\nHello\n"  # then end of input (Ctrl-D)
    rc, out, _ = run_cli(monkeypatch, capsys, ["--temperature", "0", "--max-new-tokens", "10", "--json"], stdin)
    assert rc == 0
    answers = json_lines(out)
    assert len(answers) == 3
    first, history = model.chat(tok, image, "描述这张图片。", english=False, temperature=0, max_new_tokens=10)
    second, _ = model.chat(tok, image, "这是什么动物？", history, english=False, temperature=0, max_new_tokens=10)
    third, _ = model.chat(tok, None, "Hello", english=True, temperature=0, max_new_tokens=10)
    assert [a["response"] for a in answers] == [first, second, third]
    assert len(answers[1]["history"]) == 2 and len(answers[2]["history"]) == 1  # clear started over


def test_bad_image(monkeypatch, capsys, fixture_model, tmp_path):
    rc, _, err = run_cli(monkeypatch, capsys, ["--image", str(tmp_path / "missing.png"), "--prompt", "hi"])
    assert rc == 2 and "not found" in err
    (tmp_path / "text.png").write_text("not an image")
    stdin = f"{tmp_path / 'text.png'}\n\nHello\nstop\n"  # bad image -> asked again -> text only
    rc, out, err = run_cli(monkeypatch, capsys, ["--temperature", "0", "--max-new-tokens", "4"], stdin)
    assert rc == 0 and "error:" in err and out.count("image path>") == 2 and "VisualGLM> " in out


# ----- a person at a terminal -------------------------------------------------------------------------------
class Terminal:
    """The chat command on a pseudo-terminal: type, read the screen, press Ctrl-C."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the pty is its controlling terminal, so ^C sends SIGINT
            # a user's shell starts it with SIGINT at its default; a test run launched in the background
            # (`cmd &` without job control) would pass on SIG_IGN, which the chat rightly leaves alone
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execv(sys.executable, [sys.executable, "-m", "visualglm", "chat", *argv])
        self.screen = ""

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while (m := re.search(pattern, self.screen)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"did not see {pattern!r}; screen:\n{self.screen[-2000:]}")
            if select.select([self.fd], [], [], left)[0]:
                try:
                    self.screen += os.read(self.fd, 65536).decode("utf-8", "replace")
                except OSError:  # the child exited
                    raise AssertionError(f"exited before {pattern!r}; screen:\n{self.screen[-2000:]}") from None
        self.screen = self.screen[m.end():]
        return m

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):  # drain the screen so the child never blocks on it
                    os.read(self.fd, 65536)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the chat did not exit")


def test_ctrl_c_interrupts_the_answer_not_the_program(reference_dir):
    term = Terminal([*model_flags(reference_dir), "--temperature", "0", "--max-length", "512"])
    try:
        term.expect(r"image path> ")
        term.type("\n")  # text only
        term.expect(r"user> ")
        term.type("Hello, who are you?\n")  # its greedy answer runs ~500 tokens
        term.expect(r"VisualGLM> \S+ \S+ \S+")  # words are streaming in
        term.type("\x03")  # Ctrl-C
        term.expect(r"\[interrupted\]")
        term.expect(r"user> ")  # still running, same conversation
        term.type("\x03")  # Ctrl-C at the prompt only clears the line
        term.expect(r"user> ")
        term.type("stop\n")
        assert term.wait() == 0
    finally:
        try:
            os.kill(term.pid, signal.SIGKILL)
            os.waitpid(term.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(term.fd)


def test_quant_flag_reaches_loading(monkeypatch, capsys, reference_dir):
    """--quant 8 (from the shared model flags) loads a quantized model and still answers."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc = cli.main(["chat", *model_flags(reference_dir), "--quant", "8", "--prompt", "你好", "--temperature", "0",
                   "--max-new-tokens", "6", "--json"])
    (result,) = json_lines(capsys.readouterr().out)
    assert rc == 0 and isinstance(result["response"], str) and result["history"][0][0] == "你好"
