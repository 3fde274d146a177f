"""The decoder service over gRPC: the real decoder servicer and engine (in-process, tests/inprocess.py) against a real encoder and Redis.

Operations (health, reflection, ListModels), every validation error with the
status and the request field it names, embeddings from another model refused,
admission control (RESOURCE_EXHAUSTED), cancellation and deadlines that free
the running slot; and, as a `mmserve decoder` process, a clean exit on SIGTERM.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve.api.common.v1 import media_pb2
from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as pb_grpc
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from mmserve.store import EmbeddingStore
from tests.conftest import GrpcServices, StartService
from tests.inprocess import InProcessService, InProcessServices
from tests.support import encoder_stub, image_item, png_bytes, rpc_error, scrape

SERVICE = "mmserve.decoder.v1.DecoderService"
RUNNING = "mmserve_num_requests_running"
IMAGE = media_pb2.MODALITY_IMAGE


def text(value: str) -> pb.ContentPart:
    return pb.ContentPart(text=value)


def media(item: media_pb2.MediaInput) -> pb.ContentPart:
    return pb.ContentPart(media=item)


def user(*parts: pb.ContentPart) -> pb.ChatMessage:
    return pb.ChatMessage(role=pb.ROLE_USER, content=list(parts))


def request(*messages: pb.ChatMessage, model: str = "", **sampling: object) -> pb.GenerateRequest:
    """A GenerateRequest; by default one user message "Hello", greedy, 4 tokens."""
    params = {"temperature": 0.0, "max_tokens": 4, **sampling}
    return pb.GenerateRequest(
        model=model,
        messages=list(messages) or [user(text("Hello"))],
        sampling=pb.SamplingParams(**params),  # type: ignore[arg-type]
    )


def long_request() -> pb.GenerateRequest:
    """A generation that runs for many seconds unless stopped."""
    return request(user(text("Write a very long story.")), max_tokens=4000, ignore_eos=True)


@pytest.fixture(scope="module")
def channel(grpc_services: GrpcServices) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_services.decoder.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def decoder(channel: grpc.Channel) -> pb_grpc.DecoderServiceStub:
    return pb_grpc.DecoderServiceStub(channel)


def own_decoder(inprocess: InProcessServices, grpc_services: GrpcServices, **settings: object) -> Iterator[InProcessService]:
    """An in-process decoder with these settings on the session's encoder and Redis, stopped at the end."""
    service = inprocess.start("decoder", redis_url=grpc_services.redis_url, encoder_target=grpc_services.encoder.target, **settings)
    yield service
    inprocess.stop(service)


@pytest.fixture(scope="module")
def small_context(inprocess: InProcessServices, grpc_services: GrpcServices) -> Iterator[InProcessService]:
    """A decoder whose context holds 64 tokens, on the session's encoder and Redis."""
    yield from own_decoder(inprocess, grpc_services, max_model_len=64)


@pytest.fixture(scope="module")
def single_slot_decoder(inprocess: InProcessServices, grpc_services: GrpcServices) -> Iterator[InProcessService]:
    yield from own_decoder(inprocess, grpc_services, max_running_requests=1, max_waiting_requests=0)


@pytest.fixture
def single_slot(single_slot_decoder: InProcessService) -> InProcessService:
    """A decoder that generates one request at a time and queues none (the process's engine gauges show its engine)."""
    single_slot_decoder.own_gauges()
    return single_slot_decoder


def running(service: InProcessService) -> float:
    return scrape(service.metrics_url)[RUNNING]


def wait_running(service: InProcessService, value: float, timeout: float = 5.0) -> float:
    """Poll the decoder's running gauge until it equals `value`; return how long that took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if running(service) == value:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{RUNNING} is {running(service)}, not {value}, after {timeout}s")


def generate_text(stub: pb_grpc.DecoderServiceStub, req: pb.GenerateRequest, **kwargs: object) -> str:
    return "".join(r.text for r in stub.Generate(req, **kwargs))


# --- operations ------------------------------------------------------------------------


def test_health_serving_and_reflection(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert SERVICE in services and "grpc.health.v1.Health" in services
    database = ProtoReflectionDescriptorDatabase(channel)
    methods = {m.name for m in database.FindFileContainingSymbol(SERVICE).service[0].method}
    assert methods == {"Generate", "ListModels"}


def test_list_models_card(decoder: pb_grpc.DecoderServiceStub, grpc_services: GrpcServices) -> None:
    models = decoder.ListModels(pb.ListModelsRequest()).models
    assert len(models) == 1
    card = models[0]
    assert card.id == "mmserve-tiny-random"
    assert card.owned_by == "mmserve" and card.source == "tiny:qwen2_5_vl-tiny" and card.family == "qwen2_5_vl"
    assert abs(card.created - time.time()) < 24 * 3600
    assert IMAGE in card.modalities and media_pb2.MODALITY_UNSPECIFIED not in card.modalities
    assert card.max_model_len == 32768
    assert card.random_weights is True
    with encoder_stub(grpc_services.encoder.target) as enc:
        info = enc.GetModelInfo(enc_pb.GetModelInfoRequest())
    assert card.model_fingerprint == info.model_fingerprint != ""


def test_generate_by_served_name_and_unknown_model(decoder: pb_grpc.DecoderServiceStub) -> None:
    responses = list(decoder.Generate(request(model="mmserve-tiny-random")))
    assert responses[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert responses[-1].usage.completion_tokens == sum(len(r.token_ids) for r in responses) <= 4

    code, err = rpc_error(lambda: list(decoder.Generate(request(model="gpt-7"))))
    assert code == grpc.StatusCode.NOT_FOUND
    assert err.field == "model" and "gpt-7" in err.message and err.reason == "MODEL_NOT_FOUND"


# --- validation ------------------------------------------------------------------------------

ASSISTANT_WITH_IMAGE = pb.ChatMessage(role=pb.ROLE_ASSISTANT, content=[media(image_item(png_bytes(seed=900)))])
INVALID = {
    "no messages": (pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4)), "messages"),
    "temperature 3": (request(temperature=3.0), "sampling.temperature"),
    "top_p 0": (request(top_p=0.0), "sampling.top_p"),
    "5 stop strings": (request(stop=["a", "b", "c", "d", "e"]), "sampling.stop"),
    "unspecified role": (request(pb.ChatMessage(content=[text("hi")])), "messages[0].role"),
    "media from the assistant": (request(user(text("hi")), ASSISTANT_WITH_IMAGE, user(text("and?"))), "messages[1].content[0]"),
    "reserved token in text": (request(user(text("look: <|image_pad|> here"))), "messages[0].content[0]"),
    "n 0": (request(n=0), "sampling.n"),
    "empty stop string": (request(stop=[""]), "sampling.stop"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_argument_names_the_field(decoder: pb_grpc.DecoderServiceStub, grpc_services: GrpcServices, case: str) -> None:
    req, field = INVALID[case]
    before = scrape(grpc_services.encoder.metrics_url).get('mmserve_requests_total{outcome="OK",rpc="Encode",service="encoder"}', 0.0)
    code, err = rpc_error(lambda: list(decoder.Generate(req)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.field == field and err.message
    after = scrape(grpc_services.encoder.metrics_url).get('mmserve_requests_total{outcome="OK",rpc="Encode",service="encoder"}', 0.0)
    assert after == before, "a request refused for its form still reached the encoder"


def test_valid_neighbours_of_the_invalid_cases_pass(decoder: pb_grpc.DecoderServiceStub) -> None:
    """The boundaries: temperature 2, top_p 1, 4 stop strings, an assistant text turn are all fine."""
    ok = [
        request(temperature=2.0, seed=1),
        request(top_p=1.0),
        request(stop=["a", "b", "c", "d"]),
        request(user(text("hi")), pb.ChatMessage(role=pb.ROLE_ASSISTANT, content=[text("hello")]), user(text("and?"))),
    ]
    for req in ok:
        last = list(decoder.Generate(req))[-1]
        assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED and last.usage.total_tokens > 0


def test_prompt_longer_than_the_context(small_context: InProcessService) -> None:
    with grpc.insecure_channel(small_context.target) as ch:
        stub = pb_grpc.DecoderServiceStub(ch)
        assert stub.ListModels(pb.ListModelsRequest()).models[0].max_model_len == 64
        code, err = rpc_error(lambda: list(stub.Generate(request(user(text("word " * 100))))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.field == "messages" and "64" in err.message

        # max_tokens that does not fit beside the prompt, and one that does
        code, err = rpc_error(lambda: list(stub.Generate(request(max_tokens=60))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.field == "sampling.max_tokens" and "64" in err.message
        last = list(stub.Generate(request(max_tokens=8, ignore_eos=True)))[-1]
        assert last.usage.completion_tokens == 8 and last.finish_reason == pb.FINISH_REASON_LENGTH

        # with no max_tokens, the completion is capped by the room left in the context
        last = list(stub.Generate(request(max_tokens=None, ignore_eos=True)))[-1]  # type: ignore[arg-type]
        assert last.usage.total_tokens == 64 and last.finish_reason == pb.FINISH_REASON_LENGTH


# --- stored embeddings ----------------------------------------------------------------


def test_embedding_from_another_model_is_failed_precondition(decoder: pb_grpc.DecoderServiceStub, grpc_services: GrpcServices) -> None:
    with encoder_stub(grpc_services.encoder.target) as enc:
        ours = enc.Encode(enc_pb.EncodeRequest(items=[image_item(png_bytes(seed=901), uuid="dec-ours")])).results[0].embedding

    async def plant() -> None:
        async with EmbeddingStore(grpc_services.redis_url, ttl_s=600) as store:
            stored = await store.get("dec-ours", tenant="default")
            assert stored is not None
            foreign = type(stored.descriptor)()
            foreign.CopyFrom(stored.descriptor)
            foreign.id, foreign.model_fingerprint, foreign.model = "dec-foreign", "other-model-fp-1234", "other"
            await store.put(foreign, stored.tensors, tenant="default")

    asyncio.run(plant())

    def ask(uuid: str) -> pb.GenerateRequest:
        return request(user(text("What is it?"), media(media_pb2.MediaInput(modality=IMAGE, uuid=uuid))))

    code, err = rpc_error(lambda: list(decoder.Generate(ask("dec-foreign"))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "MODEL_MISMATCH" and err.field == "messages[0].content[1]"
    assert "other-model-fp-1234" in err.message and ours.model_fingerprint in err.message

    # the same tensors under our own fingerprint are served (the refusal is about the model only)
    last = list(decoder.Generate(ask("dec-ours")))[-1]
    assert last.usage.cached_media == 1 and last.usage.prompt_tokens > ours.token_count


def test_a_reference_of_another_modality_is_the_same_400_in_both_services(
    decoder: pb_grpc.DecoderServiceStub, grpc_services: GrpcServices
) -> None:
    """An image embedding named by a video part: INVALID_ARGUMENT / MODALITY_MISMATCH from the encoder and the decoder alike."""
    with encoder_stub(grpc_services.encoder.target) as enc:
        enc.Encode(enc_pb.EncodeRequest(items=[image_item(png_bytes(seed=902), uuid="dec-an-image")]))
        as_video = media_pb2.MediaInput(modality=media_pb2.MODALITY_VIDEO, uuid="dec-an-image")
        enc_code, enc_err = rpc_error(lambda: enc.Encode(enc_pb.EncodeRequest(items=[as_video])))
    dec_code, dec_err = rpc_error(lambda: list(decoder.Generate(request(user(text("What is it?"), media(as_video))))))
    assert enc_code == dec_code == grpc.StatusCode.INVALID_ARGUMENT
    assert enc_err.reason == dec_err.reason == "MODALITY_MISMATCH"
    assert (enc_err.field, dec_err.field) == ("items[0].modality", "messages[0].content[1].modality")
    assert "is image, not video" in enc_err.message and "is image, not video" in dec_err.message


def test_unknown_references_are_not_found_listing_all(decoder: pb_grpc.DecoderServiceStub) -> None:
    fake = "mmemb-" + "ab" * 32
    req = request(
        user(
            media(media_pb2.MediaInput(modality=IMAGE, uuid="dec-missing-1")),
            text("and"),
            media(media_pb2.MediaInput(modality=IMAGE, source=media_pb2.MediaSource(embedding_id=fake))),
        )
    )
    code, err = rpc_error(lambda: list(decoder.Generate(req)))
    assert code == grpc.StatusCode.NOT_FOUND and err.reason == "EMBEDDING_NOT_FOUND"
    assert err.metadata["missing"].split(",") == ["dec-missing-1", fake]
    assert "dec-missing-1" in err.message and fake in err.message and err.field == "messages[0].content[0]"


# --- admission, cancellation, deadlines ---------------------------------------------------


def test_second_concurrent_request_is_resource_exhausted(single_slot: InProcessService) -> None:
    with grpc.insecure_channel(single_slot.target) as ch:
        stub = pb_grpc.DecoderServiceStub(ch)
        first = stub.Generate(long_request())
        try:
            next(first)
            assert running(single_slot) == 1
            code, err = rpc_error(lambda: list(stub.Generate(request())))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "QUEUE_FULL"
            assert next(first).index == 0  # the first one is unaffected
        finally:
            first.cancel()
        wait_running(single_slot, 0)
        assert generate_text(stub, request(max_tokens=3, ignore_eos=True)) != ""


def test_cancelled_call_frees_its_slot(single_slot: InProcessService) -> None:
    with grpc.insecure_channel(single_slot.target) as ch:
        stub = pb_grpc.DecoderServiceStub(ch)
        wait_running(single_slot, 0)
        call = stub.Generate(long_request())
        for _ in range(5):
            next(call)
        assert running(single_slot) == 1
        call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
        wait_running(single_slot, 0, timeout=3)
        last = list(stub.Generate(request(max_tokens=5, ignore_eos=True)))[-1]
        assert last.usage.completion_tokens == 5


def test_cancelled_call_that_is_not_being_read_frees_its_slot(single_slot: InProcessService) -> None:
    """The client stops reading (server blocked on flow control), then cancels: the slot is freed all the same."""
    with grpc.insecure_channel(single_slot.target) as ch:
        stub = pb_grpc.DecoderServiceStub(ch)
        wait_running(single_slot, 0)
        call = stub.Generate(long_request())
        next(call)
        time.sleep(1.0)  # the server keeps generating into the transport while nobody reads
        call.cancel()
        wait_running(single_slot, 0, timeout=3)
        assert generate_text(stub, request(max_tokens=3, ignore_eos=True)) != ""


def test_deadline_shorter_than_the_generation(single_slot: InProcessService) -> None:
    with grpc.insecure_channel(single_slot.target) as ch:
        stub = pb_grpc.DecoderServiceStub(ch)
        wait_running(single_slot, 0)
        received: list[pb.GenerateResponse] = []
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            for response in stub.Generate(long_request(), timeout=1.5):
                received.append(response)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert time.monotonic() - start < 5
        assert received and all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in received)
        wait_running(single_slot, 0, timeout=3)
        assert generate_text(stub, request(max_tokens=3, ignore_eos=True)) != ""


@pytest.fixture(scope="module")
def one_waiting_decoder(inprocess: InProcessServices, grpc_services: GrpcServices) -> Iterator[InProcessService]:
    yield from own_decoder(inprocess, grpc_services, max_running_requests=1, max_waiting_requests=1)


@pytest.fixture
def one_waiting(one_waiting_decoder: InProcessService) -> InProcessService:
    """A decoder with one running slot and room for one request to wait (the process's engine gauges show its engine)."""
    one_waiting_decoder.own_gauges()
    return one_waiting_decoder


def test_a_request_waits_for_a_free_slot_and_only_then_is_refused(one_waiting: InProcessService) -> None:
    """With one running and one waiting slot, a second request waits (not refused) and runs when the first ends; a third is refused."""
    metrics = one_waiting.metrics_url
    with grpc.insecure_channel(one_waiting.target) as ch:
        stub = pb_grpc.DecoderServiceStub(ch)
        first = stub.Generate(long_request())
        next(first)
        results: list[list[pb.GenerateResponse]] = []
        waiter = threading.Thread(target=lambda: results.append(list(stub.Generate(request(max_tokens=3, ignore_eos=True)))))
        waiter.start()
        try:
            deadline = time.monotonic() + 5
            while scrape(metrics)["mmserve_num_requests_waiting"] != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert scrape(metrics)["mmserve_num_requests_waiting"] == 1
            code, err = rpc_error(lambda: list(stub.Generate(request())))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "QUEUE_FULL"
            time.sleep(0.5)
            assert results == [], "the waiting request ran while the only slot was taken"
        finally:
            first.cancel()
            waiter.join(30)
        assert results and results[0][-1].usage.completion_tokens == 3
        assert scrape(metrics)["mmserve_num_requests_waiting"] == 0
        assert scrape(metrics)["mmserve_request_queue_time_seconds_count"] >= 2


# --- shutdown ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_exits_cleanly(start_service: StartService, grpc_services: GrpcServices) -> None:
    """A `mmserve decoder` process (on the in-process encoder) serves, then exits 0 within the grace on SIGTERM."""
    dec = start_service("decoder", redis_url=grpc_services.redis_url, MMSERVE_ENCODER_TARGET=grpc_services.encoder.target)
    with grpc.insecure_channel(dec.target) as ch:
        assert generate_text(pb_grpc.DecoderServiceStub(ch), request(max_tokens=2, ignore_eos=True)) != ""
    proc = dec.process.proc
    assert proc is not None
    start = time.monotonic()
    assert dec.stop() == 0  # SIGTERM, then waits
    assert time.monotonic() - start < 10
    assert "shutting down" in dec.process.log_text()
