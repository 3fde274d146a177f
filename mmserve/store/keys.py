"""Redis key names of stored embeddings, and the rules for client uuids and tenants.

Layout (docs/architecture.md, "The embedding store"): `<prefix>:{<slot>}:data` and `<prefix>:{<slot>}:meta`
with prefix `mmserve:emb:v1`. The braces are a Redis Cluster hash tag: both
keys of one embedding hash to the same slot, so they can be written in one
transaction on a cluster too.

Tenancy lives here and nowhere else: every slot starts with its tenant,
`c:<tenant>:<content id>` for content ids and `u:<tenant>:<uuid>` for client
uuids. So a tenant can only ever name its own embeddings: another tenant's id,
even a content id derived from the very same media, resolves to keys of its
own namespace, which are absent unless it stored that media itself (then it
has its own record: no read, use, delete, or `cached` answer can tell what
another tenant stored). Uuids and tenants exclude `{`/`}` (the tag stays
intact) and tenants exclude `:` (the slot parses one way only).
A put first uploads the data under `<prefix>:{<slot>}:put:<token>` (same
slot, short-lived) and a script then renames it into place, so the upload
never goes through Lua and the placement is atomic on a cluster too.
A record larger than the store's chunk size keeps its data in several values:
`:data` (chunk 0), `:data:1`, `:data:2`, ... (same slot; the count is the
sealed meta field `chunks`, absent for a single value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmserve.errors import InvalidArgument
from mmserve.store.identity import CONTENT_ID_PREFIX, is_content_id
from mmserve.tenancy import validate_tenant

DEFAULT_KEY_PREFIX = "mmserve:emb:v1"
UUID_RE = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def _shown(value: object) -> str:
    """A bounded repr for error messages (a bad id can be arbitrarily long)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_uuid(uuid: str, field: str = "uuid") -> str:
    """Accept a client uuid or raise InvalidArgument naming `field`."""
    if not isinstance(uuid, str) or UUID_RE.fullmatch(uuid) is None:
        raise InvalidArgument(
            f"{_shown(uuid)} is not a valid uuid: use 1-128 characters of A-Z a-z 0-9 . _ : / -",
            field=field,
        )
    if uuid.startswith(CONTENT_ID_PREFIX):
        raise InvalidArgument(f"uuids must not start with {CONTENT_ID_PREFIX!r} (reserved for content ids)", field=field)
    return uuid


def slot_of(ref: str, *, tenant: str, field: str = "uuid") -> str:
    """The hash-tag content for a reference, always under its tenant (the one tenancy rule)."""
    if is_content_id(ref):
        return f"c:{validate_tenant(tenant)}:{ref}"
    return f"u:{validate_tenant(tenant)}:{validate_uuid(ref, field)}"


@dataclass(frozen=True)
class EmbeddingKeys:
    """The two Redis keys of one embedding (same cluster slot)."""

    data: str
    meta: str

    def chunk(self, index: int) -> str:
        """Where data chunk `index` of a chunked record lives (chunk 0 is `data` itself; same slot)."""
        return self.data if index == 0 else f"{self.data}:{index}"

    def upload(self, token: str) -> str:
        """Where a put stages its data before placing it (same slot as `data` and `meta`)."""
        return f"{self.data.removesuffix(':data')}:put:{token}"

    @property
    def lease(self) -> str:
        """The short-lived encode lease of this id (same slot): one encoder runs the model for it at a time."""
        return f"{self.data.removesuffix(':data')}:lease"


def embedding_keys(ref: str, *, tenant: str, prefix: str = DEFAULT_KEY_PREFIX, field: str = "uuid") -> EmbeddingKeys:
    """Keys for a reference string (a content id, or a client uuid of `tenant`)."""
    base = f"{prefix}:{{{slot_of(ref, tenant=tenant, field=field)}}}"
    return EmbeddingKeys(data=f"{base}:data", meta=f"{base}:meta")
