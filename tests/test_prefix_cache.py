"""The prefix cache and chunked prefill, on the real stack, against the monolithic model.

- The same image asked about again reuses the KV of the image and the text
  before it (`usage.prompt_tokens_details.cached_tokens`), and the answer is
  unchanged; another image behind the same placeholder ids reuses only the
  text before it.
- A decoder that prefills in chunks of 16 tokens, with 16-token cache blocks
  (so that hits end inside an image, and Qwen3-VL's deepstack features are
  sliced per chunk), still gives the monolithic model's greedy output; and so
  does Gemma 3, whose image tokens attend to each other both ways, with a hit
  that ends inside an image.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mmserve.localredis import LocalRedis
from tests.conftest import Stack, start_inprocess_stack
from tests.inprocess import InProcessServices
from tests.support import data_url, png_bytes, scrape
from tests.test_equivalence_modalities import FAMILIES, MAX_TOKENS, FamilyReference, references  # noqa: F401 - fixture

SYSTEM = "You are a careful assistant who looks at pictures and answers in one sentence. " * 3


@pytest.fixture(scope="module")
def stack(inprocess_stack: Stack) -> Stack:
    """The session's stack in the test process: nothing in this module needs a service process."""
    return inprocess_stack


def ask(stack: Stack, png: bytes, question: str) -> tuple[str, int, int]:
    reply = stack.client().chat.completions.create(
        model="",
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": question}]},
        ],
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
    )
    details = reply.usage.prompt_tokens_details
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens, details.cached_tokens if details else 0


def test_the_same_image_asked_again_skips_its_prefill(stack: Stack) -> None:
    image, other = png_bytes(160, 128, seed=301), png_bytes(160, 128, seed=302)
    before = scrape(stack.decoder.metrics_url)
    first, prompt_tokens, cached_first = ask(stack, image, "What is this?")
    again, _, cached_again = ask(stack, image, "What is this?")
    assert again == first
    assert cached_again >= prompt_tokens - 16  # everything but the last partial block
    _, _, cached_other = ask(stack, other, "What is this?")
    # same pad ids, another image: only the text before the image (the system prompt) is reused
    assert cached_first <= cached_other <= cached_again - 32
    after = scrape(stack.decoder.metrics_url)
    hits = after["mmserve_prefix_cache_hits_total"] - before["mmserve_prefix_cache_hits_total"]
    queries = after["mmserve_prefix_cache_queries_total"] - before["mmserve_prefix_cache_queries_total"]
    assert hits == cached_first + cached_again + cached_other and queries == 3 * prompt_tokens


@pytest.fixture(scope="module")
def chunked(inprocess: InProcessServices, module_redis: LocalRedis) -> Iterator[dict[str, Stack]]:
    """Per family (started on first use): a decoder prefilling in chunks of 16 tokens with 16-token cache blocks."""
    started: dict[str, Stack] = {}

    class Lazy(dict):
        def __missing__(self, family: str) -> Stack:
            self[family] = started[family] = start_inprocess_stack(
                inprocess,
                module_redis.url,
                model=f"tiny:{FAMILIES[family]}",
                prefill_chunk_tokens=16,
                prefix_cache_block_tokens=16,
            )
            return started[family]

    yield Lazy()
    for stack in started.values():
        stack.stop()


def conversation(question: str) -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
    ]


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3"])
def test_chunked_prefill_and_partial_image_hits_equal_the_monolithic_model(
    chunked: dict[str, Stack],
    references: dict[str, FamilyReference],  # noqa: F811 - fixture
    family: str,
) -> None:
    stack = chunked[family]
    image = png_bytes(128, 96, seed=303)
    want = references[family].generate_media(conversation("What is this?"), images=[image])
    assert len(set(want)) > 5
    got, prompt_tokens, cached = ask(stack, image, "What is this?")
    assert prompt_tokens > 3 * 16 and cached < prompt_tokens // 2
    assert got == want
    got_again, _, cached_again = ask(stack, image, "What is this?")
    assert cached_again > cached and got_again == want
    metrics = scrape(stack.decoder.metrics_url)
    assert metrics['mmserve_engine_step_seconds_count{phase="prefill"}'] > 3  # the prompt went in several chunks


def test_a_hit_that_ends_inside_a_bidirectional_image_equals_the_monolithic_model(
    chunked: dict[str, Stack],
    references: dict[str, FamilyReference],  # noqa: F811 - fixture
) -> None:
    """Gemma 3: the same image with another question reuses blocks ending inside the image, whose tokens attend to
    each other both ways; the rest of the image is prefilled in one forward with the cached part, as the reference."""
    image = png_bytes(128, 96, seed=304)
    ref = references["gemma3"]
    first, _, _ = ask(chunked["gemma3"], image, "What is this?")
    assert first == ref.generate_media(conversation("What is this?"), images=[image])
    question = "Which colour is it?"
    want = ref.generate_media(conversation(question), images=[image])
    assert len(set(want)) > 5
    got, _, cached = ask(chunked["gemma3"], image, question)
    text = ref.processor.apply_chat_template(conversation(question), add_generation_prompt=True, tokenize=False)
    ids = ref.processor(text=[text], images=ref.media_kwargs(images=[image])["images"], return_tensors="pt")["input_ids"][0]
    image_at = (ids == ref.model.config.image_token_id).nonzero().view(-1).tolist()
    assert image_at[0] < cached < image_at[-1] + 1, "the hit should end inside the image"
    assert got == want
