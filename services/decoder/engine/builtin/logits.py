"""The logits processors of one request, applied per row inside the batched step: the one place they live.

In order (vLLM's order): logit bias, min_tokens (EOS masked), repetition
penalty (prompt and completion tokens, as in transformers), presence and
frequency penalties (completion tokens, as OpenAI defines them), then the
grammar mask of structured outputs. Each choice keeps its own token counts
and grammar state, so `n` choices of one request are independent. A request
that sets none of them builds nothing and costs nothing.
"""

from __future__ import annotations

from typing import Any

import llguidance
import torch

from services.decoder.conversation import SamplingConfig
from services.decoder.guidance import grammar_tokenizer

BITS = torch.arange(32, dtype=torch.int32)


def mask_disallowed(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf for every token whose bit is 0 in `bitmask` ([rows, words] int32); ids past the mask are disallowed too.

    Written here rather than llguidance.torch.apply_token_bitmask_inplace, which is torch.compile'd: a first
    call on the CPU would compile C++ for seconds while every request in the batch waits.
    """
    vocab = logits.shape[-1]
    allowed = ((bitmask.unsqueeze(-1) >> BITS) & 1).reshape(bitmask.shape[0], -1).bool()
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    logits.masked_fill_(~allowed[:, :vocab].to(logits.device), float("-inf"))


class LogitsProcessors:
    """See the module docstring; `bool(self)` is False when the request sets no processor."""

    def __init__(
        self,
        config: SamplingConfig,
        *,
        vocab_size: int,
        eos: frozenset[int],
        prompt_ids: list[int],
        grammar: str | None,
        tokenizer: Any,
        device: torch.device,
    ) -> None:
        n = config.n
        self.config = config
        self.generated = [0] * n
        self.bias: torch.Tensor | None = None
        if config.logit_bias:
            self.bias = torch.zeros(vocab_size, device=device)
            ids = torch.tensor(list(config.logit_bias), device=device)
            self.bias[ids] = torch.tensor(list(config.logit_bias.values()), device=device)
        self.eos = torch.tensor(sorted(eos), dtype=torch.long, device=device) if config.min_tokens and eos else None
        self.counts: torch.Tensor | None = None
        if config.presence_penalty or config.frequency_penalty:
            self.counts = torch.zeros(n, vocab_size, device=device)
        self.seen: torch.Tensor | None = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                self.seen[:, torch.tensor(prompt_ids, device=device)] = True
        self.matchers: list[llguidance.LLMatcher] | None = None
        if grammar is not None:
            lltok = grammar_tokenizer(tokenizer)
            self.matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(n)]
            self.bitmask = torch.zeros(n, (lltok.vocab_size + 31) // 32, dtype=torch.int32)
        self.active = any(x is not None for x in (self.bias, self.eos, self.counts, self.seen, self.matchers))

    def __bool__(self) -> bool:
        return self.active

    def __call__(self, logits: torch.Tensor, choices: list[int]) -> torch.Tensor:
        """Processed copy of `logits` ([rows, vocab]); row r is choice `choices[r]`."""
        logits = logits.clone()
        rows = torch.tensor(choices, device=logits.device)
        if self.bias is not None:
            logits += self.bias
        if self.eos is not None:
            early = [r for r, c in enumerate(choices) if self.generated[c] < self.config.min_tokens]
            if early:
                logits[torch.tensor(early).unsqueeze(1), self.eos] = float("-inf")
        if self.seen is not None:
            penalty = self.config.repetition_penalty
            scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self.seen[rows], scaled, logits)
        if self.counts is not None:
            counts = self.counts[rows]
            logits -= self.config.frequency_penalty * counts + self.config.presence_penalty * (counts > 0)
        if self.matchers is not None:
            for c in choices:
                self.matchers[c].unsafe_compute_mask_ptr(self.bitmask[c].data_ptr(), self.bitmask.shape[1] * 4)
            mask_disallowed(logits, self.bitmask[rows.cpu()])
        return logits

    def accept(self, choices: list[int], tokens: list[int]) -> None:
        """Record each choice's new token (counts, grammar state)."""
        for c, token in zip(choices, tokens, strict=True):
            self.generated[c] += 1
            if self.counts is not None:
                self.counts[c, token] += 1
            if self.seen is not None:
                self.seen[c, token] = True
            if self.matchers is not None and not self.matchers[c].is_stopped():
                self.matchers[c].consume_token(token)
