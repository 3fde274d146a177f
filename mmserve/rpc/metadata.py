"""Request-scoped gRPC metadata: request id, tenant, and deadline propagation.

The gateway puts `x-request-id` and `x-mmserve-tenant` on its call; each
service reads them here and passes them, with the caller's remaining
deadline, on every downstream call it makes.
"""

from __future__ import annotations

import contextvars
import uuid

import grpc

from mmserve.log import request_id_var

REQUEST_ID_KEY = "x-request-id"
TENANT_KEY = "x-mmserve-tenant"

tenant_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmserve_tenant", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def read_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Invocation metadata as a dict of str (binary headers dropped)."""
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata to send downstream from inside a request: its id and tenant."""
    md = [(REQUEST_ID_KEY, request_id_var.get())]
    tenant = tenant_var.get()
    if tenant:
        md.append((TENANT_KEY, tenant))
    return tuple(md)


def remaining_timeout(context: grpc.aio.ServicerContext | None, default: float | None = None) -> float | None:
    """Seconds left of the caller's deadline (None if it set none), to pass downstream."""
    if context is None:
        return default
    left = context.time_remaining()
    if left is None:
        return default
    return max(0.0, float(left))
