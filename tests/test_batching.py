"""Correctness under continuous batching, for every family and modality, on the real stack.

For each family, a set of requests (text of different lengths, every media
modality the family takes, an image referenced by uuid, greedy and seeded
sampling, n = 2, different max_tokens) is first sent one at a time, then all
at once together with one long request that is cancelled midway. Every
request must get exactly the token ids it got alone, and the greedy ones must
still equal the monolithic transformers reference. The decoder's metrics must
show that the requests really were batched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from mmserve.api.common.v1 import media_pb2
from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as pb_grpc
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from mmserve.localredis import LocalRedis
from tests.conftest import Stack, start_inprocess_stack
from tests.inprocess import InProcessServices
from tests.support import encoder_stub, image_item, png_bytes, scrape
from tests.test_equivalence_modalities import (
    AUDIO,
    FAMILIES,
    IMAGE,
    MAX_TOKENS,
    MODALITIES,
    SERIES,
    VIDEO,
    FamilyReference,
    references,  # noqa: F401 - fixture
    wav_bytes,
)

pytestmark = pytest.mark.slow  # every family twice, each request alone then batched: ~20 s in all
QUESTION = {"image": "What is this?", "video": "What happens?", "audio": "What is said?", "time_series": "Describe the trend."}
STORED_IMAGE = png_bytes(112, 72, seed=21)
STORED_AUDIO = wav_bytes(seconds=1.5, seed=21)


def stored_modality(family: str) -> str:
    """What the by-uuid case refers to: an image, or audio for a family without images."""
    return "image" if "image" in MODALITIES[family] else "audio"


def stored_item(family: str) -> media_pb2.MediaInput:
    """The item stored under the family's uuid before the cases run."""
    uuid = f"batch-stored-{family}"
    if stored_modality(family) == "image":
        return image_item(STORED_IMAGE, uuid=uuid)
    return media_pb2.MediaInput(
        modality=media_pb2.MODALITY_AUDIO,
        source=media_pb2.MediaSource(data=STORED_AUDIO),
        audio=media_pb2.AudioOptions(format="wav"),
        uuid=uuid,
    )


def media(modality: str) -> media_pb2.MediaInput:
    if modality == "image":
        return media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, source=media_pb2.MediaSource(data=IMAGE))
    if modality == "video":
        return media_pb2.MediaInput(
            modality=media_pb2.MODALITY_VIDEO, source=media_pb2.MediaSource(data=VIDEO), video=media_pb2.VideoOptions(fps=2, num_frames=8)
        )
    if modality == "audio":
        return media_pb2.MediaInput(
            modality=media_pb2.MODALITY_AUDIO, source=media_pb2.MediaSource(data=AUDIO), audio=media_pb2.AudioOptions(format="wav")
        )
    return media_pb2.MediaInput(
        modality=media_pb2.MODALITY_TIME_SERIES,
        source=media_pb2.MediaSource(data=SERIES),
        time_series=media_pb2.TimeSeriesOptions(sampling_rate=100),
    )


@dataclass
class Case:
    """One request, and what it must give."""

    name: str
    request: pb.GenerateRequest
    reference: tuple[str, str] | None = None  # (kind, question) for greedy cases checked against the monolithic model
    alone: dict[int, list[int]] = field(default_factory=dict)


def user(*parts: pb.ContentPart) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=pb.ROLE_USER, content=list(parts))]


def cases(family: str) -> list[Case]:
    greedy = pb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    out = [
        Case(
            "text-short",
            pb.GenerateRequest(messages=user(pb.ContentPart(text="Hi")), sampling=pb.SamplingParams(temperature=0, max_tokens=9)),
            ("text", "Hi"),
        ),
        Case(
            "text-long",
            pb.GenerateRequest(
                messages=user(pb.ContentPart(text="Tell me a long story about the sea, the wind and the ships. " * 6)), sampling=greedy
            ),
            ("text", "Tell me a long story about the sea, the wind and the ships. " * 6),
        ),
        Case(
            "text-seeded-n2",
            pb.GenerateRequest(
                messages=user(pb.ContentPart(text="Once upon a time")),
                sampling=pb.SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7, n=2, max_tokens=20, ignore_eos=True),
            ),
        ),
        Case(
            f"{stored_modality(family)}-by-uuid-seeded",
            pb.GenerateRequest(
                messages=user(
                    pb.ContentPart(media=media_pb2.MediaInput(modality=stored_item(family).modality, uuid=f"batch-stored-{family}")),
                    pb.ContentPart(text="And now?"),
                ),
                sampling=pb.SamplingParams(temperature=0.7, seed=11, max_tokens=12, ignore_eos=True),
            ),
        ),
    ]
    for modality in MODALITIES[family]:
        out.append(
            Case(
                f"{modality}-greedy",
                pb.GenerateRequest(
                    messages=user(pb.ContentPart(media=media(modality)), pb.ContentPart(text=QUESTION[modality])), sampling=greedy
                ),
                (modality, QUESTION[modality]),
            )
        )
    return out


def token_ids(target: str, request: pb.GenerateRequest) -> dict[int, list[int]]:
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        out: dict[int, list[int]] = {}
        for response in pb_grpc.DecoderServiceStub(channel).Generate(request, timeout=120):
            out.setdefault(response.index, []).extend(response.token_ids)
        return out


def cancelled_midway(target: str, seen: threading.Event) -> int:
    """A long request abandoned after a few tokens; returns how many it got."""
    request = pb.GenerateRequest(
        messages=user(pb.ContentPart(text="Count to a thousand.")),
        sampling=pb.SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True),
    )
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.DecoderServiceStub(channel).Generate(request, timeout=120)
        got = 0
        for _ in call:
            got += 1
            if got == 3:
                seen.set()
                call.cancel()
                break
        return got


def reference_text(ref: FamilyReference, kind: str, question: str) -> str:
    if kind == "text":
        return ref.generate([{"role": "user", "content": question}], [], MAX_TOKENS if question != "Hi" else 9)[1]
    if kind == "time_series":
        return ref.generate_series(question, SERIES, 100.0)
    content = [{"type": kind}, {"type": "text", "text": question}]
    media_kwargs = {"image": {"images": [IMAGE]}, "video": {"videos": [VIDEO]}, "audio": {"audios": [AUDIO]}}[kind]
    return ref.generate_media([{"role": "user", "content": content}], **media_kwargs)


#: Decoder variants: the defaults (the tiny models' small layers stay on MKL), and every linear layer through oneDNN.
VARIANTS: dict[str, dict[str, int]] = {"default": {}, "onednn": {"onednn_min_weights": 0}}


@pytest.fixture(scope="module")
def family_stacks(inprocess: InProcessServices, module_redis: LocalRedis) -> Iterator[dict[tuple[str, str], Stack]]:
    """One in-process stack per family and decoder variant, started on first use (the engine gauges show the one asked for)."""
    started: dict[tuple[str, str], Stack] = {}

    class Lazy(dict):
        def __getitem__(self, key: tuple[str, str]) -> Stack:
            stack: Stack = super().__getitem__(key)
            stack.decoder.own_gauges()  # type: ignore[union-attr]
            return stack

        def __missing__(self, key: tuple[str, str]) -> Stack:
            family, variant = key
            stack = start_inprocess_stack(inprocess, module_redis.url, model=f"tiny:{FAMILIES[family]}", **VARIANTS[variant])
            with encoder_stub(stack.encoder.target) as stub:
                stub.Encode(enc_pb.EncodeRequest(items=[stored_item(family)]))
            started[key] = stack
            self[key] = stack
            return stack

    yield Lazy()
    for stack in started.values():
        stack.stop()


def _max_running_seen(metrics_url: str, stop: threading.Event) -> list[float]:
    seen: list[float] = []
    while not stop.is_set():
        seen.append(scrape(metrics_url).get("mmserve_num_requests_running", 0.0))
        time.sleep(0.05)
    return seen


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_request_in_a_batch_gets_the_tokens_it_gets_alone(
    family_stacks: dict[tuple[str, str], Stack],
    references: dict[str, FamilyReference],  # noqa: F811 - fixture
    family: str,
    variant: str,
) -> None:
    stack = family_stacks[family, variant]
    target = stack.decoder.target
    todo = cases(family)
    for case in todo:
        case.alone = token_ids(target, case.request)
        assert all(case.alone.values()), case.name
    before = scrape(stack.decoder.metrics_url)

    stop = threading.Event()
    seen = threading.Event()
    with ThreadPoolExecutor(len(todo) + 2) as pool:
        watcher = pool.submit(_max_running_seen, stack.decoder.metrics_url, stop)
        cancelled = pool.submit(cancelled_midway, target, seen)
        together = list(pool.map(lambda c: token_ids(target, c.request), todo))
        stop.set()
        assert cancelled.result() == 3
        running_samples = watcher.result()

    for case, got in zip(todo, together, strict=True):
        assert got == case.alone, f"{family}/{case.name}: batched output differs from the same request alone"
    ref = references[family]
    tokenizer = ref.processor.tokenizer
    for case in todo:
        if case.reference is not None:
            want = reference_text(ref, *case.reference)
            assert len(set(want)) > 3, f"degenerate reference for {case.name}"
            configured = ref.model.generation_config.eos_token_id
            eos = {
                t
                for t in [tokenizer.eos_token_id, *([configured] if isinstance(configured, int) else configured or [])]
                if isinstance(t, int)
            }
            ids = [t for t in case.alone[0] if t not in eos]
            assert tokenizer.decode(ids, skip_special_tokens=True) == want, f"{family}/{case.name} differs from the monolithic reference"

    after = scrape(stack.decoder.metrics_url)
    assert max(running_samples) >= 2, "requests were never in the batch together"
    steps = after["mmserve_batch_size_count"] - before["mmserve_batch_size_count"]
    single = after['mmserve_batch_size_bucket{le="1.0"}'] - before['mmserve_batch_size_bucket{le="1.0"}']
    assert steps > 0 and single < steps, "every decode step ran one sequence: nothing was batched"
    for phase in ("prefill", "decode"):
        key = f'mmserve_engine_step_seconds_count{{phase="{phase}"}}'
        assert after[key] > before[key]
    deadline = time.monotonic() + 10
    while scrape(stack.decoder.metrics_url)["mmserve_num_requests_running"] != 0:  # the cancelled request left too
        assert time.monotonic() < deadline, "a request stayed in the batch after everything ended"
        time.sleep(0.1)
    final = scrape(stack.decoder.metrics_url)
    assert final['mmserve_kv_cache_tokens{state="used"}'] <= final['mmserve_kv_cache_tokens{state="total"}']
    assert final["mmserve_num_preemptions_total"] == 0
