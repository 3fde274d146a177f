"""Pick the next token of each sequence: logits processors, then greedy or temperature/top-k/top-p/min-p with a seeded generator.

The warpers are transformers' own (the same code `generate()` uses), so a
sampled request behaves like the reference implementation. Each choice has
its own `torch.Generator`, used once per token: the same seed and inputs give
the same tokens whatever else is in the batch at the time.

Logprobs are those of the distribution the token was drawn from: after the
logits processors, temperature and top-k/top-p/min-p (vLLM's
`processed_logprobs`); for greedy requests, after the processors. Tokens that
distribution excludes get MIN_LOGPROB.
"""

from __future__ import annotations

import secrets

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.decoder.conversation import SamplingConfig
from services.decoder.engine.base import MIN_LOGPROB, Logprob
from services.decoder.engine.builtin.logits import LogitsProcessors


class Sampler:
    """Token choice for a request with `n` choices."""

    def __init__(self, config: SamplingConfig, device: torch.device, processors: LogitsProcessors | None = None) -> None:
        self.greedy = config.greedy
        self.logprobs = config.logprobs
        self.top_logprobs = config.top_logprobs
        self.processors = processors if processors else None
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            if config.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k > 0:
                self.warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(config.top_p))
            if config.min_p > 0.0:
                self.warpers.append(MinPLogitsWarper(config.min_p))
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        self.generators = []
        for row in range(config.n):
            gen = torch.Generator(device=device)
            gen.manual_seed((seed + row) % (1 << 63))
            self.generators.append(gen)

    def __call__(self, logits: torch.Tensor, choices: list[int]) -> tuple[list[int], list[Logprob] | None]:
        """One token per row of `logits` ([rows, vocab], float32); row r is choice `choices[r]`; and their logprobs if asked."""
        if self.processors is not None:
            logits = self.processors(logits, choices)
        if self.greedy:
            scores = logits
            tokens = logits.argmax(dim=-1).tolist()
        else:
            scores = self.warpers(None, logits)  # type: ignore[arg-type]  # these warpers ignore input_ids
            probs = torch.softmax(scores, dim=-1)
            tokens = [int(torch.multinomial(probs[r], 1, generator=self.generators[c])) for r, c in enumerate(choices)]
        if self.processors is not None:
            self.processors.accept(choices, tokens)
        return tokens, self._logprobs(scores, tokens) if self.logprobs else None

    def _logprobs(self, scores: torch.Tensor, tokens: list[int]) -> list[Logprob]:
        logprobs = torch.log_softmax(scores.float(), dim=-1).clamp(min=MIN_LOGPROB)
        chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device).view(-1, 1)).view(-1).tolist()
        out = [Logprob(t, lp) for t, lp in zip(tokens, chosen, strict=True)]
        if self.top_logprobs:
            values, ids = logprobs.topk(self.top_logprobs, dim=-1)
            for row, (vs, xs) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
                out[row].top = list(zip(xs, vs, strict=True))
        return out
