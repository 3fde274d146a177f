"""OpenTelemetry spans across gateway -> decoder -> encoder, when an OTLP endpoint is configured.

Off by default: with MMSERVE_OTLP_ENDPOINT unset nothing is imported and no
interceptor is installed, so tracing costs nothing. When set, each process
exports its spans over OTLP/HTTP (`<endpoint>/v1/traces`) as service
`mmserve-<role>`; the gRPC and FastAPI instrumentations propagate the trace
context (W3C traceparent) in request metadata, so one request is one trace
across all three services. The request id stays a span attribute.
"""

from __future__ import annotations

import logging
from typing import Any

from mmserve.config import Settings

log = logging.getLogger("mmserve.tracing")
_provider: Any = None


def enabled(settings: Settings) -> bool:
    return bool(settings.otlp_endpoint)


def setup(service: str, settings: Settings) -> None:
    """Install the tracer provider for this process (no-op when tracing is off)."""
    global _provider
    if not enabled(settings) or _provider is not None:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise SystemExit("MMSERVE_OTLP_ENDPOINT is set but OpenTelemetry is not installed: pip install 'mmserve[tracing]'") from exc
    endpoint = str(settings.otlp_endpoint).rstrip("/")
    _provider = TracerProvider(resource=Resource.create({"service.name": f"mmserve-{service}"}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
    trace.set_tracer_provider(_provider)
    log.info("tracing on: exporting spans to %s/v1/traces", endpoint)


def server_interceptors(settings: Settings) -> list[Any]:
    """gRPC server interceptors that open a span per RPC (empty when tracing is off)."""
    if not enabled(settings):
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    # Not the health service: the clients' health checks are long-lived Watch streams, which this
    # interceptor breaks (a checked channel then sees no healthy backend), and they are no request's span.
    return [aio_server_interceptor(filter_=filters.negate(filters.health_check()))]


def client_interceptors(settings: Settings) -> list[Any] | None:
    """gRPC client interceptors that propagate the trace context (None when tracing is off)."""
    if not enabled(settings):
        return None
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

    return list(aio_client_interceptors(filter_=filters.negate(filters.health_check())))


def instrument_app(app: Any, settings: Settings) -> None:
    """Spans for every HTTP request of the gateway (no-op when tracing is off)."""
    if enabled(settings):
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls="health,metrics")


def shutdown() -> None:
    """Flush spans still buffered (call on exit)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None
