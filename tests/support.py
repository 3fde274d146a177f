"""Small helpers shared by the tests: media generation, gRPC stubs, typed errors, metrics."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import redis
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mmserve.api.common.v1 import media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2_grpc
from mmserve.errors import MmserveError, from_rpc_error
from mmserve.samples import data_url, png_bytes  # noqa: F401 - re-exported for the tests


def image_item(data: bytes | None = None, *, url: str | None = None, uuid: str = "", **options: object) -> media_pb2.MediaInput:
    source = media_pb2.MediaSource(url=url) if url is not None else media_pb2.MediaSource(data=data or b"")
    item = media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, source=source, uuid=uuid)
    if options:
        item.image.CopyFrom(media_pb2.ImageOptions(**options))  # type: ignore[arg-type]
    return item


@contextmanager
def encoder_stub(target: str) -> Iterator[encoder_service_pb2_grpc.EncoderServiceStub]:
    with grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    ) as channel:
        yield encoder_service_pb2_grpc.EncoderServiceStub(channel)


def rpc_error(call: object, *args: object, **kwargs: object) -> tuple[grpc.StatusCode, MmserveError]:
    """Call, expect a gRPC error, return its status code and the typed error rebuilt from its details."""
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), from_rpc_error(exc)  # type: ignore[attr-defined]
    raise AssertionError("the call succeeded but an error was expected")


def redis_keys(url: str) -> list[str]:
    client = redis.Redis.from_url(url)
    try:
        return sorted(k.decode() for k in client.keys("*"))
    finally:
        client.close()


def scrape(metrics_url: str) -> dict[str, float]:
    """Prometheus samples as {'name{label="v",...}': value}."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=30) as response:  # a busy 2-core machine (vLLM polls both cores) answers slowly
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


class Reference:
    """The monolithic transformers model: what the split path must reproduce token for token."""

    def __init__(self, path: object) -> None:
        import transformers
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(path)
        self.family = config.model_type
        cls = {
            "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
            "qwen2_5_omni": transformers.Qwen2_5OmniThinkerForConditionalGeneration,
            "gemma3": transformers.Gemma3ForConditionalGeneration,
            "voxtral": transformers.VoxtralForConditionalGeneration,
        }[config.model_type]
        self.model = cls.from_pretrained(path).eval()
        self.processor = AutoProcessor.from_pretrained(path)

    def generate(self, conversation: list[dict], images: list[bytes] = (), max_new_tokens: int = 24) -> tuple[list[int], str]:  # type: ignore[assignment]
        """Greedy `model.generate(**processor(...), do_sample=False)`: (new token ids without EOS, decoded text)."""

        if self.family == "voxtral":  # mistral_common encodes the chat itself: its text form does not re-tokenize
            inputs = self.processor.apply_chat_template(conversation)
        else:
            text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            pil = [Image.open(io.BytesIO(p)).convert("RGB") for p in images]
            inputs = self.processor(text=[text], images=pil or None, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos)
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        return ids, self.processor.tokenizer.decode(ids, skip_special_tokens=True)
