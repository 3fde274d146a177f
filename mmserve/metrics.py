"""Prometheus metrics of every mmserve process, named per docs/architecture.md ("Metrics and logs").

One module so that names, units and labels are decided once. Labels stay
low-cardinality (service, rpc, outcome, modality); never an id.
Each process exposes the default registry: the gateway at /metrics on its
HTTP port, the gRPC services on their own `MMSERVE_METRICS_PORT`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

# `*_created` series double every counter's output and nobody graphs them.
disable_created_metrics()

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

REQUESTS = Counter("mmserve_requests", "Requests served, by service, rpc/route and outcome.", ["service", "rpc", "outcome"])
IN_FLIGHT = Gauge("mmserve_requests_in_flight", "Requests being served now, by service.", ["service"])
REQUEST_SECONDS = Histogram("mmserve_request_duration_seconds", "Time to serve a request.", ["service", "rpc"], buckets=_LATENCY)

# encoder
CACHE_HITS = Counter("mmserve_encoder_cache_hits", "Media items served from the store without encoding.", ["modality"])
CACHE_MISSES = Counter("mmserve_encoder_cache_misses", "Media items that had to be encoded.", ["modality"])
ENCODE_SECONDS = Histogram("mmserve_encode_seconds", "Time the modality tower spends on one batch.", ["modality"], buckets=_LATENCY)
ENCODED_ITEMS = Counter("mmserve_encoder_items_encoded", "Media items run through a modality tower.", ["modality"])
LEASE_WAITS = Counter(
    "mmserve_encoder_lease_waits",
    "Media items another encoder was already encoding: this one waited for its result instead of running the model.",
    ["modality"],
)
FETCH_SECONDS = Histogram("mmserve_fetch_seconds", "Time to acquire one media item's bytes.", ["modality"], buckets=_LATENCY)
STORE_BYTES = Counter("mmserve_store_bytes_written", "Bytes of embeddings written to the store.")

# store (any process that reads it)
STORE_CORRUPT = Counter(
    "mmserve_store_corrupt_records",
    "Stored embedding records that failed the integrity check and were dropped, by reason (checksum, incomplete, old_format).",
    ["reason"],
)

# decoder
DECODER_CACHE_HITS = Counter(
    "mmserve_decoder_cache_hits", "Embeddings a decoder took from its in-memory cache (seal checked in Redis, no tensor read)."
)
DECODER_CACHE_MISSES = Counter("mmserve_decoder_cache_misses", "Embeddings a decoder read in full from the store.")
DECODER_CACHE_BYTES = Gauge("mmserve_decoder_cache_bytes", "Bytes of embeddings held in the decoder's in-memory cache.")
TTFT = Histogram("mmserve_time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY)
ITL = Histogram("mmserve_inter_token_latency_seconds", "Time between tokens.", buckets=_TOKEN_LATENCY)
E2E = Histogram("mmserve_e2e_request_latency_seconds", "Request latency end to end.", buckets=_LATENCY)
QUEUE_SECONDS = Histogram("mmserve_request_queue_time_seconds", "Time waiting for a decoder slot.", buckets=_LATENCY)
PROMPT_TOKENS = Counter("mmserve_prompt_tokens", "Prompt tokens processed.")
GENERATION_TOKENS = Counter("mmserve_generation_tokens", "Tokens generated.")
RUNNING = Gauge("mmserve_num_requests_running", "Requests in the engine's batch now (prefilling or decoding).")
WAITING = Gauge("mmserve_num_requests_waiting", "Requests admitted but not yet in the batch (queued for a slot or for KV cache).")
BATCH_SIZE = Histogram(
    "mmserve_batch_size", "Sequences advanced together by one decode step.", buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
)
ENGINE_STEP_SECONDS = Histogram(
    "mmserve_engine_step_seconds", "Time of one engine forward, by phase (prefill chunk or decode step).", ["phase"], buckets=_LATENCY
)
KV_CACHE_TOKENS = Gauge("mmserve_kv_cache_tokens", "KV cache tokens: `used` (reserved + prefix cache) and `total` (the budget).", ["state"])
KV_CACHE_USAGE = Gauge("mmserve_kv_cache_usage_ratio", "Share of the KV cache budget in use (0..1).")
PREEMPTIONS = Counter("mmserve_num_preemptions", "Requests preempted to free KV cache (0 by design: admission reserves the worst case).")
PREFIX_CACHE_QUERIES = Counter("mmserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
PREFIX_CACHE_HITS = Counter("mmserve_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache.")


class RpcRecorder:
    """Counts, times and tracks in-flight RPCs of one gRPC service (driven by its interceptor)."""

    def __init__(self, service: str) -> None:
        self.service = service

    def started(self) -> None:
        IN_FLIGHT.labels(self.service).inc()

    def __call__(self, rpc: str, outcome: str, seconds: float) -> None:
        IN_FLIGHT.labels(self.service).dec()
        REQUESTS.labels(self.service, rpc, outcome).inc()
        REQUEST_SECONDS.labels(self.service, rpc).observe(seconds)


def serve_metrics(port: int | None, host: str = "0.0.0.0") -> None:
    """Expose /metrics over HTTP on `port` (no-op when None)."""
    if port is not None:
        start_http_server(port, addr=host)
