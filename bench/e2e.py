"""End-to-end latency through the whole stack, as ratios against baselines in the same run.

    python bench/e2e.py [--models tiny,tiny:qwen2_5_vl-mid] [--tokens 32] [--repeats 3] [--stack-env KEY=VALUE ...]

For each model, starts Redis, an encoder, a decoder and the gateway (the same
commands as `mmserve up`), loads the same checkpoint in this process, and
measures with the official OpenAI SDK:

- overhead: end-to-end latency of a chat completion with one image (a fresh
  image each time, so it is really fetched from a data URL and encoded)
  through the gateway, against the monolithic in-process
  `model.generate(**processor(...))` on the same images, same number of
  tokens (EOS ignored on both sides); ratio service / monolithic;
- reuse: time to first token when the image is already stored (referenced by
  uuid) against sending it as a data URL (fresh each time); ratio;
- stages (where the overhead goes): the same chat sent to the decoder's
  Generate RPC directly (no gateway, no HTTP), the encoder's Encode RPC
  alone on a fresh image, and the SDK's own client-side cost of the call
  (`sdk_client_s`: the same call against a local server that answers at once
  with a canned completion), which `overhead_ratio_without_sdk` leaves out.

The two sides alternate request by request, so that load from anything else on
the machine weighs on both alike. Prints one JSON line. Medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from PIL import Image

from gateway.schemas import ChatCompletionRequest
from gateway.translate import to_generate_request
from mmserve.api.common.v1 import media_pb2
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as dec_grpc
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from mmserve.api.encoder.v1 import encoder_service_pb2_grpc as enc_grpc
from mmserve.config import Settings
from mmserve.launcher import LocalStack
from mmserve.samples import data_url, png_bytes

PROMPT = "Describe this picture in detail."


def square_png(size: int, seed: int) -> bytes:
    """A random-noise RGB PNG of size x size, distinct per seed."""
    return png_bytes(size, size, seed)


class Monolithic:
    """The same checkpoint loaded whole in this process: processor + `generate`, the baseline."""

    def __init__(self, model: str, cache_dir: Path) -> None:
        from transformers import AutoProcessor

        from mmserve.models.loading import load_model
        from mmserve.models.source import resolve_model

        source = resolve_model(model, revision=None, cache_dir=cache_dir)
        self.model: Any = load_model(Settings(model=model, cache_dir=cache_dir), part="full").family.model  # a transformers model
        self.processor = AutoProcessor.from_pretrained(source.path)
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        self.text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def seconds(self, png: bytes, tokens: int) -> float:
        """Seconds of processor + greedy generate of exactly `tokens` tokens for one image prompt."""
        import torch

        start = time.perf_counter()
        inputs = self.processor(text=[self.text], images=[Image.open(io.BytesIO(png)).convert("RGB")], return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens)
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
        return time.perf_counter() - start


def chat_body(png: bytes, tokens: int) -> dict[str, Any]:
    """The chat completion both the gateway and the direct decoder call get: one image (data URL) and the prompt."""
    return {
        "model": "",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": PROMPT}]}
        ],
        "temperature": 0,
        "max_completion_tokens": tokens,
        "ignore_eos": True,
    }


def decoder_seconds(stub: dec_grpc.DecoderServiceStub, png: bytes, tokens: int) -> float:
    """Seconds of the same chat through the decoder's Generate RPC, translated as the gateway does, without HTTP."""
    request = to_generate_request(ChatCompletionRequest.model_validate(chat_body(png, tokens)))
    start = time.perf_counter()
    replies = list(stub.Generate(request))
    elapsed = time.perf_counter() - start
    assert sum(len(r.token_ids) for r in replies) == tokens
    return elapsed


def encode_seconds(stub: enc_grpc.EncoderServiceStub, png: bytes) -> float:
    """Seconds of the encoder's Encode RPC alone for one fresh image (its bytes, as a decoder sends them)."""
    item = media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, source=media_pb2.MediaSource(data=png))
    start = time.perf_counter()
    stub.Encode(enc_pb.EncodeRequest(items=[item]))
    return time.perf_counter() - start


def service_seconds(client: object, png: bytes, tokens: int) -> float:
    """Seconds of one non-streamed chat completion with `png` as a data URL, through the gateway.

    The data URL is built before the clock starts, as the PNG is for the
    monolithic side: each side starts from the image in its input form.
    """
    body = chat_body(png, tokens)
    ignore_eos = body.pop("ignore_eos")  # not an OpenAI parameter: the SDK sends it as an extra
    start = time.perf_counter()
    reply = client.chat.completions.create(**body, extra_body={"ignore_eos": ignore_eos})  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    assert reply.usage.completion_tokens == tokens
    return elapsed


class CannedChat:
    """A loopback HTTP server answering every POST at once with one fixed chat completion of `tokens` tokens.

    What the OpenAI SDK itself costs per call (serializing the request, parsing
    the reply) with no server work behind it: the part of `e2e_service_s` that
    is the client's.
    """

    def __init__(self, tokens: int) -> None:
        reply = json.dumps({
            "id": "canned", "object": "chat.completion", "created": 0, "model": "canned",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * tokens}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 298, "completion_tokens": tokens, "total_tokens": 298 + tokens},
        }).encode()  # fmt: skip
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(reply)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                self.wfile.write(head + reply)  # one write: no Nagle / delayed-ACK stall between head and body

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def ttft_seconds(client: object, image_part: dict) -> float:
    start = time.perf_counter()
    stream = client.chat.completions.create(  # type: ignore[attr-defined]
        model="",
        messages=[{"role": "user", "content": [image_part, {"type": "text", "text": PROMPT}]}],
        temperature=0,
        max_completion_tokens=8,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = None
    for chunk in stream:
        if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.perf_counter() - start
    assert first is not None
    return first


def bench_model(
    model: str, cache_dir: Path, size: int, tokens: int, repeats: int, seed: int, extra_env: dict[str, str]
) -> dict[str, object]:
    import openai

    mono = Monolithic(model, cache_dir)  # loaded first: both sides then run under the same load, interleaved
    stack = LocalStack(model, cache_dir, extra_env=extra_env)
    try:
        client = openai.OpenAI(base_url=stack.base_url, api_key="bench", max_retries=0, timeout=600)
        for warm in (seed - 1, seed - 2):  # warm both paths
            service_seconds(client, square_png(size, warm), tokens)
            mono.seconds(square_png(size, warm), tokens)
        services, monos = [], []
        for i in range(repeats):  # fresh images each time, alternating sides so that load drifts hit both
            services.append(service_seconds(client, square_png(size, seed + i), tokens))
            monos.append(mono.seconds(square_png(size, seed + i), tokens))
        e2e_service, e2e_mono = statistics.median(services), statistics.median(monos)
        canned = CannedChat(tokens)
        try:
            sdk = openai.OpenAI(base_url=canned.base_url, api_key="bench", max_retries=0, timeout=60)
            sdk_client = statistics.median(service_seconds(sdk, square_png(size, seed + 6000 + i), tokens) for i in range(repeats))
        finally:
            canned.close()
        with grpc.insecure_channel(stack.decoder_target) as dec_channel, grpc.insecure_channel(stack.encoder_target) as enc_channel:
            decoder, encoder = dec_grpc.DecoderServiceStub(dec_channel), enc_grpc.EncoderServiceStub(enc_channel)
            direct = statistics.median(decoder_seconds(decoder, square_png(size, seed + 3000 + i), tokens) for i in range(repeats))
            encode = statistics.median(encode_seconds(encoder, square_png(size, seed + 4000 + i)) for i in range(repeats))

        stored = square_png(size, seed + 1000)
        item = media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, uuid="bench-image", source=media_pb2.MediaSource(data=stored))
        with grpc.insecure_channel(stack.encoder_target) as channel:
            enc_grpc.EncoderServiceStub(channel).Encode(enc_pb.EncodeRequest(items=[item]))
        by_uuid = statistics.median(
            ttft_seconds(client, {"type": "image_url", "image_url": None, "uuid": "bench-image"}) for _ in range(repeats)
        )
        by_url = statistics.median(
            ttft_seconds(client, {"type": "image_url", "image_url": {"url": data_url(square_png(size, seed + 2000 + i))}})
            for i in range(repeats)
        )
    finally:
        stack.close()
    return {
        "model": model,
        "image_size": size,
        "tokens": tokens,
        "e2e_service_s": round(e2e_service, 4),
        "e2e_monolithic_s": round(e2e_mono, 4),
        "overhead_ratio": round(e2e_service / e2e_mono, 3),
        "sdk_client_s": round(sdk_client, 4),
        "overhead_ratio_without_sdk": round((e2e_service - sdk_client) / e2e_mono, 3),
        "decoder_direct_s": round(direct, 4),
        "gateway_share_s": round(e2e_service - direct, 4),
        "encode_rpc_s": round(encode, 4),
        "ttft_stored_uuid_s": round(by_uuid, 4),
        "ttft_data_url_s": round(by_url, 4),
        "ttft_ratio_uuid_vs_data_url": round(by_uuid / by_url, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,tiny:qwen2_5_vl-mid", help="comma-separated models to run")
    parser.add_argument("--size", type=int, default=448, help="image side in pixels")
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    parser.add_argument(
        "--stack-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the started services; repeatable"
    )
    ns = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in ns.stack_env)
    runs = [bench_model(m, ns.cache_dir, ns.size, ns.tokens, ns.repeats, seed=17, extra_env=extra_env) for m in ns.models.split(",")]
    print(json.dumps({"bench": "e2e", "cpus": os.cpu_count(), "runs": runs}))


if __name__ == "__main__":
    main()
