"""Conformance with the original implementation, for every fixture folder.

Covers ``../shared/reference`` and every folder in ``VISUALGLM_REFERENCE_DIRS`` (same layout), each through
both its sat and its HF copy, loaded by ``visualglm.load``: prompt ids and 2-D positions exactly, image
embeddings and logits within 1e-4, greedy continuations, decoded responses and histories exactly, for
every recorded repetition penalty.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import visualglm
from conftest import decode_to_end, reference_dirs
from visualglm.generation.chat import make_engine, make_request, sampling_params
from visualglm.generation.engine import prompt_positions
from visualglm.model.chatglm import prefix_lm_mask
from visualglm.prompt import build_prompt

ATOL = 1e-4
LAYOUTS = ("tiny-visualglm-sat", "tiny-visualglm-hf")


def _cases(folder: Path) -> list[dict]:
    return json.loads((folder / "cases.json").read_text(encoding="utf-8"))["cases"]


PARAMS = [
    pytest.param(folder, layout, case["name"], id=f"{folder.name}-{layout.split('-')[-1]}-{case['name']}")
    for folder in reference_dirs() if (folder / "cases.json").is_file()
    for layout in LAYOUTS
    for case in _cases(folder)
]


@cache
def _model(folder: Path, layout: str):
    return visualglm.load(folder / layout, device="cpu", dtype="float32", tokenizer=folder / "tokenizer")


@cache
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "cases.safetensors"))


def _case(folder: Path, name: str) -> dict:
    return next(c for c in _cases(folder) if c["name"] == name)


def _image(folder: Path, case: dict):
    """Case a reads the PNG through our loader; later turns pass the tensor on, as the original demo does."""
    if case["image"] is None:
        return None
    if case["image_source"] == "file" and (folder / case["image"]).is_file():
        return folder / case["image"]
    return _tensors(folder)[case["image_tensor_key"]]


def test_reference_folder_found():
    assert PARAMS, "no reference cases found: ../shared/reference must sit beside the repository"


@pytest.mark.parametrize(("folder", "layout", "name"), PARAMS)
def test_prompt_ids_positions_and_mask(folder, layout, name):
    model, tok = _model(folder, layout)
    case, t = _case(folder, name), _tensors(folder)
    history = [tuple(h) for h in case["history_in"]]
    prompt = build_prompt(tok, case["query"], history, english=case["english"], image=case["image"] is not None,
                          image_length=model.config.image_length)
    assert prompt.text == case["prompt_text_after_process_image"]
    assert prompt.input_ids == case["input_ids"] == t[f"{name}.input_ids"][0].tolist()
    assert prompt.pre_image == case["pre_image"]
    pos, block, mask_pos = prompt_positions(prompt.input_ids, tok.bos_token_id,
                                            (tok.mask_token_id, tok.gmask_token_id))
    assert (pos, block) == (case["position_ids"], case["block_position_ids"])
    assert mask_pos == case["mask_position"]
    n = len(prompt.input_ids)
    full_pos = case["full_seq_position_ids_including_generation_slots"]
    full_block = case["full_seq_block_position_ids_including_generation_slots"]
    assert all(p == mask_pos for p in full_pos[n:])  # every generated token: the [gMASK] position
    assert full_block[n:] == list(range(n - case["context_length"] + 1, case["max_length"] - case["context_length"] + 1))
    mask = prefix_lm_mask(torch.arange(n)[None], n, torch.tensor([0]), torch.tensor([case["context_length"]]))
    assert torch.equal(mask[0, 0], t[f"{name}.attention_mask"][0, 0].bool())


@pytest.mark.parametrize(("folder", "layout", "name"), PARAMS)
def test_image_embeddings_and_prompt_logits(folder, layout, name):
    model, tok = _model(folder, layout)
    case, t = _case(folder, name), _tensors(folder)
    request = make_request(model, tok, _image(folder, case), case["query"], [tuple(h) for h in case["history_in"]],
                           sampling_params(tok), case["english"])
    ids = torch.tensor([request.input_ids])
    pos = torch.tensor([case["position_ids"], case["block_position_ids"]])[None]
    with torch.inference_mode():
        embeds = None
        if request.image is not None:
            assert (request.image - t[case["image_tensor_key"]]).abs().max().item() <= 1e-6
            vit = model.vision(request.image)
            assert (vit - t[f"{name}.vit_output"]).abs().max().item() <= ATOL
            assert (model.qformer(vit) - t[f"{name}.qformer_output"]).abs().max().item() <= ATOL
            embeds = model.encode_image(request.image)
            assert (embeds - t[f"{name}.image_embeds"]).abs().max().item() <= ATOL
        hidden = model(ids, pos, context_lengths=torch.tensor([case["context_length"]]), image_embeds=embeds,
                       image_offsets=torch.tensor([[0, request.pre_image]]) if embeds is not None else None,
                       logits="none")
        logits = model.glm.lm_head(hidden).double()
    assert (hidden - t[f"{name}.final_hidden"]).abs().max().item() <= ATOL
    k = case["logits_last_k"]
    assert (logits[:, -k:] - t[f"{name}.logits_last"]).abs().max().item() <= ATOL
    assert (logits[0].float().topk(5).values - t[f"{name}.logits_top5_values"]).abs().max().item() <= ATOL
    checks = case["logits_checksum_float64"]
    assert list(logits.shape) == checks["shape"]
    assert logits[0].argmax(-1).tolist() == checks["argmax_per_position"]
    assert logits.max().item() == pytest.approx(checks["max"], abs=ATOL)
    assert logits.min().item() == pytest.approx(checks["min"], abs=ATOL)
    assert logits.abs().sum().item() == pytest.approx(checks["abs_sum"], rel=1e-6)


@pytest.mark.parametrize(("folder", "layout", "name"), PARAMS)
def test_greedy_generation_and_response(folder, layout, name):
    model, tok = _model(folder, layout)
    case, t = _case(folder, name), _tensors(folder)
    history = [tuple(h) for h in case["history_in"]]
    for g in case["greedy"]:
        banned = [tuple(s) for s in g["invalid_slices"]]
        kwargs = {"max_length": g["max_length"], "top_k": g["top_k"], "top_p": g["top_p"],
                  "temperature": g["temperature"], "repetition_penalty": g["repetition_penalty"]}
        prefix = f"{name}.greedy_pen{g['repetition_penalty']}"
        # token level: the engine's ids and the raw logits each was chosen from
        request = make_request(model, tok, _image(folder, case), case["query"], history,
                               sampling_params(tok, english=case["english"], banned=banned, **kwargs),
                               case["english"])
        ids, steps = decode_to_end(make_engine(model, tok), request)
        assert ids == g["generated_ids"] == t[f"{prefix}.generated_ids"].tolist()
        top5 = steps.topk(5, dim=-1)
        assert (top5.values - t[f"{prefix}.step_logits_top5_values"]).abs().max().item() <= ATOL
        assert torch.equal(top5.indices, t[f"{prefix}.step_logits_top5_ids"])
        assert tok.decode(ids) == g["generated_text_decode"]
        # text level: the public chat() with the same settings (English mode bans the same ids itself)
        response, new_history = model.chat(tok, _image(folder, case), case["query"], history,
                                           english=case["english"], **kwargs)
        assert response == g["response"]
        assert [list(h) for h in new_history] == g["history_after"]
