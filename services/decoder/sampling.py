"""Pick the next token of each sequence: greedy, or temperature/top-k/top-p with a seeded generator.

The warpers are transformers' own (the same code `generate()` uses), so a
sampled request behaves like the reference implementation. Each sequence has
its own `torch.Generator`: the same seed and inputs give the same tokens
whatever else the server is doing at the time.
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
    """Token choice for a request with `n` sequences (rows of the logits)."""

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

    def __call__(self, logits: torch.Tensor) -> list[int]:
        """One token per row of `logits` ([n, vocab], float32)."""
        if self.greedy:
            return logits.argmax(dim=-1).tolist()
        scores = self.warpers(None, logits)  # type: ignore[arg-type] - warpers here ignore input_ids
        probs = torch.softmax(scores, dim=-1)
        return [int(torch.multinomial(probs[row], 1, generator=gen)) for row, gen in enumerate(self.generators)]
