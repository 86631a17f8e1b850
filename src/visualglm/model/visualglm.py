"""VisualGLM = image -> EVA ViT -> Q-Former -> glm_proj -> 32 embeddings spliced into ChatGLM's input.

Fusion is early: the prompt holds 32 placeholder ids at ``pre_image``; their embeddings are replaced by the
projected query outputs. No cross-attention inside the language model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import VisualGLMConfig
from .chatglm import ChatGLM, prefix_lm_mask
from .eva_vit import EvaViT
from .kv_cache import KVCache
from .qformer import QFormer


class VisualGLM(nn.Module):
    def __init__(self, config: VisualGLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = EvaViT(config.vision)
        self.qformer = QFormer(config.qformer)
        self.glm_proj = nn.Linear(config.qformer.hidden_size, config.glm.hidden_size)
        self.glm = ChatGLM(config.glm)

    # ----- the two entry points ------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, 224, 224) -> image embeddings (B, image_length, glm hidden)."""
        pixels = pixels.to(device=self.glm_proj.weight.device, dtype=self.vision.patch_embed.weight.dtype)
        vision = self.vision(pixels)  # (B, 257, Cv)
        queries = self.qformer(vision)  # (B, 32, Cq)
        return self.glm_proj(queries.to(self.glm_proj.weight.dtype))  # (B, 32, C)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *, context_lengths: torch.Tensor,
                starts: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                image_offsets: torch.Tensor | None = None, cache: KVCache | None = None,
                cache_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                kv_len: int | None = None, logits: str = "all") -> torch.Tensor:
        """Run ChatGLM over a chunk of tokens.

        input_ids (B, T); position_ids (B, 2, T); ``context_lengths`` (B,) absolute index of each row's
        ``<sop>``; ``starts`` (B,) first real (non-pad) index. ``image_embeds`` (N, 32, C) go to rows
        ``image_offsets`` (N, 2) = (row, first placeholder index within this chunk). With a cache, the chunk
        sits at absolute positions ``cache_pos`` (B, T) and attends to the first ``kv_len`` positions.
        ``logits``: "all", "last" (one row per sequence) or "none" (final hidden states).
        """
        b, t = input_ids.shape
        embeds = self.glm.word_embeddings(input_ids)
        if image_embeds is not None and image_embeds.shape[0]:
            embeds = splice_images(embeds, image_embeds, image_offsets)
        if cache_pos is None:
            cache_pos = torch.arange(t, device=input_ids.device).expand(b, t)
        if starts is None:
            starts = torch.zeros(b, dtype=torch.long, device=input_ids.device)
        key_len = t if cache is None else (kv_len if kv_len is not None else int(cache_pos.max()) + 1)
        mask = prefix_lm_mask(cache_pos, key_len, starts, context_lengths)
        hidden = self.glm(embeds, position_ids, mask, cache, cache_pos, slots)
        if logits == "none":
            return hidden
        if logits == "last":
            # 2-D rows: a strided (B, 1, C) view makes F.linear take its bmm path, which copies the
            # transposed 130k-row lm_head (1 GB at the 6B size) on every prefill
            return self.glm.lm_head(hidden[:, -1]).unsqueeze(1)
        return self.glm.lm_head(hidden)

    # ----- helpers for callers ---------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        g = self.config.glm
        heads = self.glm.layers[0].attention.num_heads  # may be a shard of g.num_heads under TP
        # the compute dtype (a quantized embedding table holds int8)
        return KVCache(g.num_layers, batch, heads, g.head_dim, capacity, self.dtype, self.device)

    @property
    def device(self) -> torch.device:
        return self.glm.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.glm.final_layernorm.weight.dtype

    def named_linears(self) -> Iterator[tuple[str, nn.Linear]]:
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                yield name, mod

    # ----- chat API (HF-style, the original's signatures) ------------------------------------
    def chat(self, tokenizer: Any, image: Any, query: str, history: list | None = None, **kwargs: Any
             ) -> tuple[str, list[tuple[str, str]]]:
        from ..generation.chat import chat
        return chat(self, tokenizer, image, query, history, **kwargs)

    def stream_chat(self, tokenizer: Any, image: Any, query: str, history: list | None = None, **kwargs: Any
                    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        from ..generation.chat import stream_chat
        return stream_chat(self, tokenizer, image, query, history, **kwargs)

    def batch_chat(self, tokenizer: Any, items: list, **kwargs: Any) -> list[str]:
        from ..generation.chat import batch_chat
        return batch_chat(self, tokenizer, items, **kwargs)


def splice_images(embeds: torch.Tensor, image_embeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Replace placeholder embeddings: image i fills row offsets[i,0], columns offsets[i,1] + [0, 32)."""
    n, length, _ = image_embeds.shape
    rows = offsets[:, 0:1].expand(n, length)  # (N, 32)
    cols = offsets[:, 1:2] + torch.arange(length, device=offsets.device)  # (N, 32)
    embeds = embeds.clone()
    embeds[rows, cols] = image_embeds.to(embeds.dtype)
    return embeds
