"""OpenTelemetry: one request is one trace across gateway -> decoder -> encoder.

A real OTLP/HTTP receiver (a local HTTP server decoding the protobuf export
requests, standing in for a collector) collects the spans of a stack started
with MMSERVE_OTLP_ENDPOINT; a chat request with an image must produce spans
from all three services under one trace id, chained parent to child.
Without the endpoint, nothing is exported and no tracing code is loaded.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from mmserve.localredis import LocalRedis
from tests.conftest import Stack, StartService, start_stack
from tests.support import data_url, png_bytes


class Collector:
    """Receives OTLP/HTTP trace exports; keeps (service, span) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
                    for scope in resource_spans.scope_spans:
                        outer.spans.extend((service, span) for span in scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


@pytest.fixture(scope="module")
def traced(start_service: StartService, collector: Collector, module_redis: LocalRedis) -> Iterator[Stack]:
    stack = start_stack(start_service, module_redis.url, MMSERVE_OTLP_ENDPOINT=collector.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    yield stack
    stack.stop()


def test_one_request_is_one_trace_across_three_services(traced: Stack, collector: Collector) -> None:
    client = traced.client()
    reply = client.chat.completions.with_raw_response.create(
        model="",
        max_completion_tokens=4,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=901))}}],
            }
        ],
    )
    assert reply.http_response.status_code == 200
    deadline = time.monotonic() + 20
    chain: dict[str, object] = {}
    while time.monotonic() < deadline:
        by_name = {(service, span.name): span for service, span in collector.spans}  # type: ignore[attr-defined]
        encode = by_name.get(("mmserve-encoder", "/mmserve.encoder.v1.EncoderService/Encode"))
        generate = by_name.get(("mmserve-decoder", "/mmserve.decoder.v1.DecoderService/Generate"))
        http_spans = [s for svc, s in collector.spans if svc == "mmserve-gateway" and "chat/completions" in s.name]  # type: ignore[attr-defined]
        if encode and generate and http_spans:
            chain = {"encode": encode, "generate": generate, "http": http_spans}
            break
        time.sleep(0.2)
    assert chain, f"spans seen: {sorted({(svc, s.name) for svc, s in collector.spans})}"  # type: ignore[attr-defined]
    trace_ids = {chain["encode"].trace_id, chain["generate"].trace_id} | {s.trace_id for s in chain["http"]}  # type: ignore[attr-defined]
    assert len(trace_ids) == 1, "gateway, decoder and encoder spans are not in one trace"
    spans = {s.span_id: s for _, s in collector.spans}  # type: ignore[attr-defined]

    def ancestors(span: object) -> list[object]:
        out = []
        while span.parent_span_id in spans:  # type: ignore[attr-defined]
            span = spans[span.parent_span_id]  # type: ignore[attr-defined]
            out.append(span)
        return out

    assert chain["generate"] in ancestors(chain["encode"])  # decoder's call led to the encoder's work
    assert any(s in ancestors(chain["generate"]) for s in chain["http"])  # the gateway's request led to Generate


def test_tracing_is_off_by_default(start_service: StartService, redis_server: LocalRedis) -> None:
    """No endpoint: the services never import OpenTelemetry (no cost), and say nothing about tracing."""
    import subprocess
    import sys

    code = "import sys, mmserve.tracing as t; from mmserve.config import Settings; t.setup('x', Settings()); print(any(m.startswith('opentelemetry') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
