"""Pick the next token of each sequence: greedy, or temperature/top-k/top-p with a seeded generator.

The warpers are transformers' own (the same code `generate()` uses), so a
sampled request behaves like the reference implementation. Each choice has
its own `torch.Generator`, used once per token: the same seed and inputs give
the same tokens whatever else is in the batch at the time.
"""

from __future__ import annotations

import secrets

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.decoder.conversation import SamplingConfig


class Sampler:
    """Token choice for a request with `n` choices."""

    def __init__(self, config: SamplingConfig, device: torch.device) -> None:
        self.greedy = config.greedy
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            if config.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k > 0:
                self.warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(config.top_p))
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        self.generators = []
        for row in range(config.n):
            gen = torch.Generator(device=device)
            gen.manual_seed((seed + row) % (1 << 63))
            self.generators.append(gen)

    def __call__(self, logits: torch.Tensor, choices: list[int]) -> list[int]:
        """One token per row of `logits` ([rows, vocab], float32); row r is choice `choices[r]`."""
        if self.greedy:
            return logits.argmax(dim=-1).tolist()
        scores = self.warpers(None, logits)  # type: ignore[arg-type]  # these warpers ignore input_ids
        probs = torch.softmax(scores, dim=-1)
        return [int(torch.multinomial(probs[r], 1, generator=self.generators[c])) for r, c in enumerate(choices)]
