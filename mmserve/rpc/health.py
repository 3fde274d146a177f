"""Client side of grpc.health.v1: wait for a service to be SERVING.

Used by `mmserve up` and the tests to wait for services, and by container
healthchecks (`mmserve health host:port`).
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", *, timeout: float = 3.0) -> bool:
    """True if the server at `target` reports SERVING for `service` now."""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def health_command(argv: list[str]) -> int:
    """Exit 0 if a gRPC service reports SERVING (or an HTTP URL answers 200)."""
    import argparse
    import urllib.request

    parser = argparse.ArgumentParser(prog="mmserve health", description=health_command.__doc__)
    parser.add_argument("target", help="host:port of a gRPC service, or an http(s):// URL")
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    ns = parser.parse_args(argv)
    if ns.target.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(ns.target, timeout=ns.timeout) as response:
                return 0 if response.status == 200 else 1
        except OSError:
            return 1
    return 0 if check(ns.target, ns.service, timeout=ns.timeout) else 1


def wait_serving(target: str, *, timeout: float, service: str = "", alive: object = None) -> None:
    """Poll until SERVING; raise TimeoutError after `timeout` s, or RuntimeError if `alive()` turns False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(target, service, timeout=1.0):
            return
        if callable(alive) and not alive():
            raise RuntimeError(f"the process serving {target} exited before it became healthy")
        time.sleep(0.2)
    raise TimeoutError(f"{target} was not SERVING within {timeout:.0f}s")
