"""The one prompt builder (chat, batch, server, web and fine-tuning data all use it).

Exactly the original's text: ``<img></img>`` when there is an image, then per history turn ``问：{q}\\n答：{a}\\n``
(English ``Q:{q}\\nA:{a}\\n``), then ``问：{query}\\n答：`` (``Q:{query}\\nA:``). With an image the ids are
``encode("<img>")`` + image_length placeholders + ``encode("</img>...")``, each chunk with its own dummy prefix;
``[gMASK] <sop>`` close the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

History = Sequence[tuple[str, str]]

IMAGE_OPEN, IMAGE_CLOSE = "<img>", "</img>"
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


@dataclass
class Prompt:
    input_ids: list[int]
    pre_image: int  # index of the first placeholder (0 without image)
    text: str


def turn_markers(english: bool) -> tuple[str, str]:
    return ("Q:", "A:") if english else ("问：", "答：")


def prompt_text(query: str, history: History = (), *, english: bool = False, image: bool = False) -> str:
    q, a = turn_markers(english)
    text = IMAGE_OPEN + IMAGE_CLOSE if image else ""
    for old_q, old_a in history:
        text += f"{q}{old_q}\n{a}{old_a}\n"
    return text + f"{q}{query}\n{a}"


def build_prompt(tokenizer, query: str, history: History = (), *, english: bool = False, image: bool = False,
                 image_length: int = 32) -> Prompt:
    text = prompt_text(query, history, english=english, image=image)
    if not image:
        return Prompt(tokenizer.encode(text), 0, text)
    head = tokenizer.encode(IMAGE_OPEN, add_special_tokens=False)
    tail = tokenizer.encode(text[len(IMAGE_OPEN):], add_special_tokens=False)
    ids = head + [tokenizer.pad_token_id] * image_length + tail
    return Prompt(tokenizer.build_inputs_with_special_tokens(ids), len(head), text)


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def process_response(text: str) -> str:
    """The original's post-processing: strip, fix the date placeholder, full-width punctuation next to CJK."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for ascii_p, wide in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")):
        text = re.sub(rf"([\u4e00-\u9fff]){ascii_p}", rf"\1{wide}", text)
        text = re.sub(rf"{ascii_p}([\u4e00-\u9fff])", rf"{wide}\1", text)
    return text


def extract_answer(tokenizer, prompt_ids: list[int], answer_ids: list[int], english: bool) -> str:
    """Decode like the original chat(): prompt (without [gMASK] <sop>) + answer, post-process, split."""
    if answer_ids and answer_ids[-1] == tokenizer.eos_token_id:
        answer_ids = answer_ids[:-1]
    text = process_response(tokenizer.decode(prompt_ids[:-2] + answer_ids))
    return text.split(turn_markers(english)[1])[-1].strip()
