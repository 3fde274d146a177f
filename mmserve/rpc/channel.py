"""Every client channel between mmserve services, built one way (gateway->decoder, gateway->encoder, decoder->encoder).

Replicas come and go, so a channel must route around them by itself:

- round-robin over every address the target resolves to, with client-side
  health checking (grpc.health.v1 Watch): a replica gets calls only while it
  reports SERVING, so one still loading its model, or draining on SIGTERM,
  gets none;
- a retry policy for UNAVAILABLE and CANCELLED: gRPC retries a call only
  until it is committed (the first response headers or message), so an
  idempotent Encode and a Generate that has not streamed its first token move
  to another replica when theirs dies; a stream already past its first token
  fails as before. CANCELLED because a server stopping gracefully cancels the
  calls its transport took but no handler had started yet
  (grpc/grpc#41785), instead of refusing them; a caller's own cancellation
  is never retried, so only a replica's CANCELLED moves;
- short reconnect backoff, so a restarted replica is reconnected (and its
  health watched) about a second after its port opens, not 20-30 s later;
- keepalive pings, so a replica that vanishes without a FIN (a dead host) is
  noticed in seconds; the servers' ping policy (`server_options`) allows them;
- DNS re-resolution that finds replicas added by `--scale` behind one name.
  gRPC's DNS resolver never polls and ignores TTLs: it resolves again only
  when the load balancer asks, i.e. when a connection to a replica is lost,
  and at most every `grpc.dns_min_time_between_resolutions_ms` (gRPC's
  default is 30 s; here 1 s). So the servers close every connection after
  `grpc_max_connection_age_s` (gRPC max_connection_age, 30 s by default,
  +-10% jitter; see `server_options`): the GOAWAY makes the client reconnect
  and re-resolve, and a replica added to the name gets calls within
  1.1 x that age plus a second (the resolution interval, the connection and
  its health check). A replica removed from the name stops getting new calls
  within the same bound; one that is also stopped gracefully (SIGTERM: health
  NOT_SERVING first) loses no call either way. `tests/test_dns_replicas.py`
  checks both for gateway -> decoder and decoder -> encoder. Service configs
  published in DNS TXT records are ignored: ours is the one below.

Every mmserve server serves grpc.health.v1: with health checking on, a
backend without it would count as unhealthy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

from mmserve import tracing
from mmserve.config import Settings
from mmserve.rpc.auth import token_interceptors

#: (service, method) pairs that are safe to run again when no response byte came back.
RETRYABLE_METHODS: tuple[tuple[str, str], ...] = (
    ("mmserve.decoder.v1.DecoderService", "Generate"),  # retried only before its first message (gRPC commits then)
    ("mmserve.decoder.v1.DecoderService", "ListModels"),
    ("mmserve.encoder.v1.EncoderService", "Encode"),  # content-addressed: encoding twice stores the same entry
    ("mmserve.encoder.v1.EncoderService", "EncodeUpload"),  # as Encode; only while its chunks fit the retry buffer
    ("mmserve.encoder.v1.EncoderService", "GetEmbedding"),
    ("mmserve.encoder.v1.EncoderService", "GetModelInfo"),
    ("grpc.health.v1.Health", "Check"),
)

#: What a replica answers when it dies or stops with the call not yet committed (the module docstring says why CANCELLED).
RETRYABLE_CODES = ["UNAVAILABLE", "CANCELLED"]
MAX_ATTEMPTS = 4  # the first try + 3 retries: 0.1 + 0.2 + 0.4 s of backoff (jittered) across replicas
RECONNECT_INITIAL_MS = 100
RECONNECT_MAX_MS = 1000  # a replica restarted after any outage is retried at least every second
CONNECT_TIMEOUT_MS = 2000  # gRPC's "min reconnect backoff": how long one connection attempt may take
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
DNS_MIN_RESOLUTION_INTERVAL_MS = 1000  # re-resolve at most once a second (gRPC's default: 30 s)
SERVER_MIN_PING_INTERVAL_MS = 5_000  # below the clients' keepalive time, so their pings are never strikes


def service_config(methods: Sequence[tuple[str, str]] = RETRYABLE_METHODS) -> dict[str, Any]:
    """The gRPC service config: round-robin, health-checked, retries on `RETRYABLE_CODES` for `methods`."""
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},  # the server-wide status every mmserve server sets
        "methodConfig": [
            {
                "name": [{"service": service, "method": method} for service, method in methods],
                "retryPolicy": {
                    "maxAttempts": MAX_ATTEMPTS,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": RETRYABLE_CODES,
                },
            }
        ],
        # Retries stop while most calls fail (a whole-service outage), so they cannot multiply the load.
        "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
    }


def message_size_options(settings: Settings) -> list[tuple[str, int]]:
    """Raise gRPC's 4 MiB default on both sides (inline media); larger items are uploaded in chunks."""
    return [
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
    ]


def client_options(settings: Settings) -> list[tuple[str, int | str]]:
    """Channel arguments of every mmserve client channel (see the module docstring for why each)."""
    return [
        *message_size_options(settings),
        ("grpc.service_config", json.dumps(service_config())),
        ("grpc.enable_retries", 1),
        # A request up to the message limit stays retryable (the channel-wide 256 MiB retry buffer still bounds the total).
        ("grpc.per_rpc_retry_buffer_size", settings.grpc_max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RESOLUTION_INTERVAL_MS),
        ("grpc.service_config_disable_resolution", 1),  # a TXT record must not replace `service_config()`
    ]


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Server arguments matching `client_options`: accept the clients' pings, age connections out for re-resolution."""
    return [
        *message_size_options(settings),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),  # never GOAWAY a client for its pings
        # Each connection is closed after about this long (+-10%): the client reconnects and re-resolves (see above).
        ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_s * 1000)),
        # Streams running when a connection ages out may finish: as long as a request may last.
        ("grpc.max_connection_age_grace_ms", int(settings.gateway_request_timeout_s * 1000)),
    ]


def client_channel(target: str, settings: Settings) -> grpc.aio.Channel:
    """An asyncio channel to `target` (`host:port`, `dns:///name:port`, `ipv4:a:p,b:p`) built as above, with tracing and the service token."""
    interceptors = [*(tracing.client_interceptors(settings) or ()), *token_interceptors(settings)]  # the token: mmserve/rpc/auth.py
    return grpc.aio.insecure_channel(target, options=client_options(settings), interceptors=interceptors)
