"""Sampling with the original (sat ``BaseStrategy``) semantics, vectorised over a batch of rows.

Per step, on the last position's logits: divide every logit by the temperature; divide the logit of every id
generated so far in this request (each id once, prompt ids never; negative logits too, so they move *up*,
unlike the HF/CTRL penalty) by the repetition penalty; ban id ranges; keep the top-k, and inside those the
smallest set whose probability reaches top-p; sample. ``do_sample=False`` or ``temperature=0`` is greedy
(the penalty still applies, as in the original). Random draws use one generator per row, so a seeded request
gives the same text alone or batched with others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Every generation knob, in one place.

    max_length: limit on the whole sequence (prompt + answer), as in the original.
    max_new_tokens: optional extra limit on the answer alone.
    temperature: > 0 divides the logits; 0 means greedy.
    top_k: keep the k most likely ids (0 = no top-k).
    top_p: nucleus threshold in (0, 1]; 1 disables it. Unlike sat, it also applies when top_k is 0.
    repetition_penalty: >= 1 (1 = off), sat semantics (see the module docstring).
    do_sample: False = greedy.
    banned: half-open id ranges [lo, hi) that may never be generated (English mode bans Chinese ids).
    seed: makes sampling reproducible; None draws from the global generator.
    stop: strings that end the answer (checked on the decoded text; not included in the answer).
    """

    max_length: int = 2048
    max_new_tokens: int | None = None
    temperature: float = 0.8
    top_k: int = 100
    top_p: float = 0.4
    repetition_penalty: float = 1.2
    do_sample: bool = True
    banned: tuple[tuple[int, int], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = [
            (self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}"),
            (self.max_new_tokens is None or self.max_new_tokens >= 1,
             f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.banned = tuple((int(lo), int(hi)) for lo, hi in self.banned)
        self.stop = tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


class RowSampler:
    """Per-row sampling state for one request: generator, banned mask, ids generated so far."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device) -> None:
        self.params = params
        self.generated = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.banned: torch.Tensor | None = None
        if params.banned:
            self.banned = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            for lo, hi in params.banned:
                self.banned[max(lo, 0): min(hi, vocab_size)] = True
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    def observe(self, token: int) -> None:
        self.generated[token] = True


def sample_rows(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """logits (B, V) -> next ids (B,), each row with its own parameters."""
    logits = logits.float()
    dev = logits.device
    temp = torch.tensor([r.params.temperature if not r.params.greedy else 1.0 for r in rows], device=dev)
    pen = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)
    generated = torch.stack([r.generated for r in rows])  # (B, V)
    logits = logits / temp[:, None]
    logits = torch.where(generated, logits / pen[:, None], logits)
    for i, r in enumerate(rows):
        if r.banned is not None:
            logits[i].masked_fill_(r.banned, float("-inf"))
    greedy = logits.argmax(dim=-1)
    if all(r.params.greedy for r in rows):
        return greedy
    k_max = max((r.params.top_k or logits.shape[-1]) for r in rows if not r.params.greedy)
    vals, idx = logits.topk(min(k_max, logits.shape[-1]), dim=-1)  # (B, k) sorted descending
    out = greedy.clone()
    for i, r in enumerate(rows):
        if r.params.greedy:
            continue
        k = min(r.params.top_k or vals.shape[-1], vals.shape[-1])
        v, ix = vals[i, :k], idx[i, :k]
        probs = torch.softmax(v, dim=-1)
        if r.params.top_p < 1.0:
            before = probs.cumsum(-1) - probs  # mass of strictly better candidates
            probs = probs.masked_fill(before > r.params.top_p, 0.0)
        # Exponential race == sampling from probs, without a host sync (no multinomial).
        noise = torch.empty_like(probs).exponential_(generator=r.generator)
        out[i] = ix[(probs / noise).argmax()]
    return out
