"""Warm the LLM before reporting SERVING: one short prefill and decode step (lazy init, allocator)."""

from __future__ import annotations

from services.decoder.conversation import SamplingConfig
from services.decoder.engine import Engine
from services.decoder.sampling import Sampler


async def warmup(engine: Engine) -> None:
    family = engine.family
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    inputs = await engine.run(family.prefill_inputs, conversation, [])
    config = SamplingConfig(max_tokens=2, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=[], n=1, ignore_eos=True)
    seqs, tokens = await engine.run(engine.prefill, inputs, Sampler(config, family.device), 1)
    await engine.run(engine.step, seqs, tokens)
