"""Request tracing in logs: one request id everywhere, one structured summary line per request per service.

A stack runs with MMSERVE_LOG_JSON=true; a chat request with an image and an
X-Request-Id must leave, in each of the three services' logs, JSON lines
carrying that id, among them exactly one summary line with its timing and
outcome (gateway: the route and HTTP status; decoder: Generate with token
counts; encoder: Encode).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from mmserve.localredis import LocalRedis
from tests.conftest import RunningService, Stack, StartService, start_stack
from tests.support import data_url, png_bytes


@pytest.fixture(scope="module")
def json_stack(start_service: StartService, module_redis: LocalRedis) -> Iterator[Stack]:
    stack = start_stack(start_service, module_redis.url, MMSERVE_LOG_JSON="true")
    yield stack
    stack.stop()


def lines_for(service: RunningService, request_id: str) -> list[dict]:
    out = []
    for line in service.process.log_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)  # every line a service writes in JSON mode parses
            if record.get("request_id") == request_id:
                out.append(record)
    return out


def test_one_id_and_one_summary_line_per_service(json_stack: Stack) -> None:
    rid = "trace-me-4242"
    body = {
        "model": "",
        "max_tokens": 4,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=4242))}}],
            }
        ],
    }
    reply = httpx.post(f"{json_stack.gateway.base_url}/chat/completions", json=body, headers={"X-Request-Id": rid}, timeout=60)
    assert reply.status_code == 200 and reply.headers["x-request-id"] == rid

    gateway = [r for r in lines_for(json_stack.gateway, rid) if "route" in r]
    assert len(gateway) == 1 and gateway[0]["status"] == 200 and gateway[0]["duration_ms"] > 0
    assert gateway[0]["route"] == "/v1/chat/completions" and gateway[0]["service"] == "gateway"

    decoder = [r for r in lines_for(json_stack.decoder, rid) if r.get("rpc")]
    assert len(decoder) == 1 and decoder[0]["rpc"] == "Generate" and decoder[0]["outcome"] == "OK"
    assert decoder[0]["prompt_tokens"] > 6 and decoder[0]["completion_tokens"] == 4 and decoder[0]["ttft_ms"] > 0

    encoder = [r for r in lines_for(json_stack.encoder, rid) if r.get("rpc")]
    assert len(encoder) == 1 and encoder[0]["rpc"] == "Encode" and encoder[0]["outcome"] == "OK" and encoder[0]["duration_ms"] > 0


def test_failed_request_is_logged_with_its_outcome(json_stack: Stack) -> None:
    rid = "trace-me-fail"
    body = {"model": "", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}]}]}
    reply = httpx.post(f"{json_stack.gateway.base_url}/chat/completions", json=body, headers={"X-Request-Id": rid}, timeout=60)
    assert reply.status_code == 400
    [gateway] = [r for r in lines_for(json_stack.gateway, rid) if "route" in r]
    assert gateway["status"] == 400
    [decoder] = [r for r in lines_for(json_stack.decoder, rid) if r.get("rpc")]
    assert decoder["outcome"] == "INVALID_ARGUMENT" and decoder["reason"] == "FETCH_REFUSED"
    encoder = lines_for(json_stack.encoder, rid)
    assert any(r.get("outcome") == "INVALID_ARGUMENT" for r in encoder)
    assert any("fetch guard refused" in r["msg"] for r in encoder)  # the detail lines carry the id too
