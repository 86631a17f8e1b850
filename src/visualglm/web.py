"""Gradio web demo: upload an image, chat with streamed answers, tune max length / top-p / temperature.

Runs the model in-process through ``model.stream_chat`` (the library's one generation loop). Generation
events share one queue slot, so requests from several browser tabs take turns instead of racing on the
model. Errors (an unreadable image, a history longer than the context) show as a message in the page and
never stop the app, unlike the original web demo.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home (must precede the import)

import gradio as gr  # noqa: E402

from .prompt import has_cjk  # noqa: E402

TITLE = "VisualGLM-6B"
INTRO = ("Upload an image, then ask about it (Chinese or English). A new image or **Clear** starts a new "
         "conversation. Temperature 0 answers greedily.")


def _english(lang: str, query: str) -> bool:
    return lang == "en" or (lang == "auto" and not has_cjk(query))


def build_demo(model: Any, tokenizer: Any, *, max_length: int = 2048, top_p: float = 0.4,
               temperature: float = 0.8, lang: str = "auto") -> gr.Blocks:
    """The Blocks app (not launched); the keyword arguments are the sliders' starting values."""

    def respond(image: Any, query: str, messages: list, history: list, max_len: float, p: float, temp: float,
                language: str) -> Iterator[tuple[list, list, str]]:
        query = (query or "").strip()
        if not query:
            yield messages, history, ""
            return
        shown = [*messages, {"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        try:
            for text, new_history in model.stream_chat(
                    tokenizer, image, query, history, english=_english(language, query),
                    max_length=int(max_len), top_p=float(p), temperature=float(temp), do_sample=temp > 0):
                shown[-1] = {"role": "assistant", "content": text}
                yield shown, new_history, ""
        except ValueError as e:  # ImageError, a prompt longer than max_length, bad knobs
            raise gr.Error(str(e)) from e

    def reset(image: Any = None) -> tuple[list, list, str, str]:
        what = f"about the {image.width}×{image.height} image" if image is not None else "(text only)"
        return [], [], "", f"New conversation {what}."

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        history = gr.State([])  # [(query, answer)] as the model sees it
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="pil", label="Image", elem_id="image", height=300)
                max_len = gr.Slider(64, 4096, value=max_length, step=1, label="Maximum length",
                                    elem_id="max_length")
                p = gr.Slider(0.01, 1.0, value=top_p, step=0.01, label="Top P", elem_id="top_p")
                temp = gr.Slider(0.0, 1.5, value=temperature, step=0.01, label="Temperature (0 = greedy)",
                                 elem_id="temperature")
                language = gr.Radio(["auto", "zh", "en"], value=lang, label="Prompt language",
                                    info="auto: English form (Q:/A:) when the question has no Chinese",
                                    elem_id="lang")
            with gr.Column(scale=4):
                status = gr.Markdown("New conversation (text only).", elem_id="status")
                chatbot = gr.Chatbot(label="VisualGLM", elem_id="chatbot", height=460)
                query = gr.Textbox(label="Question", placeholder="Ask about the image… (Enter sends)",
                                   elem_id="query")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
        inputs = [image, query, chatbot, history, max_len, p, temp, language]
        outputs = [chatbot, history, query]
        # One queue for every event that touches the conversation: they run one at a time, in order, so a
        # reset from an upload can never land after the answer that followed it.
        one_queue = {"concurrency_id": "conversation", "concurrency_limit": 1}
        for trigger in (send.click, query.submit):
            trigger(respond, inputs, outputs, **one_queue)
        # Clear, the chatbot's own trash button, and a new image (as in the original) start over.
        for trigger in (clear.click, chatbot.clear, image.change):
            trigger(reset, [image], [*outputs, status], **one_queue)
    return demo


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True) -> Any:
    """Start the server (``block=False`` returns at once, e.g. for tests)."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       quiet=not block, footer_links=[])
