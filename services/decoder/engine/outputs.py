"""Sampled tokens -> step outputs: EOS, stop strings, max tokens, UTF-8-safe text, usage. Written once.

Every engine that samples its own tokens feeds them through here, so a
request ends for the same reasons and with the same text whatever engine made
its tokens.
"""

from __future__ import annotations

from typing import Any

from services.decoder.engine.base import Finish, Logprob, StepOutput, Usage
from services.decoder.engine.textstream import TextStream


class ChoiceOutput:
    """One choice (sequence) of a request: turns each new token into a StepOutput."""

    def __init__(self, index: int, tokenizer: Any, stop: list[str], eos: frozenset[int], max_tokens: int) -> None:
        self.index = index
        self.stream = TextStream(tokenizer, stop)
        self.eos = eos
        self.max_tokens = max_tokens
        self.count = 0
        self.finish: Finish | None = None

    def append(self, token: int, logprob: Logprob | None = None) -> StepOutput:
        """Account for `token` (which counts as generated even when it is EOS, as in the OpenAI usage)."""
        self.count += 1
        if token in self.eos:
            text, self.finish = self.stream.finish(), Finish.STOP
        else:
            text = self.stream.push(token)
            if self.stream.stopped:
                self.finish = Finish.STOP
            elif self.count >= self.max_tokens:
                text += self.stream.finish()
                self.finish = Finish.LENGTH
        return StepOutput(self.index, [token], text, self.finish, logprobs=None if logprob is None else [logprob])


class RequestOutput:
    """All choices of a request, and its usage on the last output."""

    def __init__(self, n: int, tokenizer: Any, stop: list[str], eos: frozenset[int], max_tokens: int, prompt_tokens: int) -> None:
        self.choices = [ChoiceOutput(i, tokenizer, stop, eos, max_tokens) for i in range(n)]
        self.prompt_tokens = prompt_tokens
        self.cached_prompt_tokens = 0

    @property
    def finished(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    def append(self, index: int, token: int, logprob: Logprob | None = None) -> StepOutput:
        out = self.choices[index].append(token, logprob)
        if self.finished:
            out.usage = Usage(self.prompt_tokens, sum(c.count for c in self.choices), self.cached_prompt_tokens)
        return out
