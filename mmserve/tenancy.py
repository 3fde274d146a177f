"""Who is which tenant: tenant names, and the gateway's API keys mapped to them.

Import-light on purpose (no redis, no torch): the gateway checks keys with it,
and the store (mmserve/store/keys.py) validates the tenant of every key it
builds with the same rule.

Keys come from three settings, all of them usable together:
`MMSERVE_API_KEY` (one key, tenant `key-<sha256 prefix>` as before, so uuids
stored under it stay reachable), `MMSERVE_API_KEYS` (`tenant:key` pairs,
comma-separated) and `MMSERVE_API_KEYS_FILE` (one `tenant:key` per line, `#`
comments). Several keys may name one tenant (key rotation); one key naming
two tenants is a configuration error, found at start.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from mmserve.errors import InvalidArgument

if TYPE_CHECKING:
    from mmserve.config import Settings

TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_tenant(tenant: str) -> str:
    """Accept a tenant name (1-128 of A-Z a-z 0-9 . _ -) or raise InvalidArgument."""
    if not isinstance(tenant, str) or TENANT_RE.fullmatch(tenant) is None:
        raise InvalidArgument(f"{_shown(tenant)} is not a valid tenant name", field="tenant")
    return tenant


def single_key_tenant(key: str) -> str:
    """The tenant of the lone `MMSERVE_API_KEY` (derived from the key, never showing it)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def parse_pairs(lines: Iterable[str], source: str) -> list[tuple[str, str]]:
    """`tenant:key` entries -> (tenant, key); ValueError naming `source` and the entry number, never the key."""
    pairs = []
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        tenant, sep, key = entry.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not key:
            raise ValueError(f"{source}: entry {number} is not `tenant:key`")
        if TENANT_RE.fullmatch(tenant) is None:
            raise ValueError(f"{source}: entry {number}: {_shown(tenant)} is not a valid tenant name (A-Z a-z 0-9 . _ -)")
        pairs.append((tenant, key))
    return pairs


class ApiKeys:
    """The gateway's API keys and their tenants; empty means no key is required (one tenant: MMSERVE_TENANT)."""

    def __init__(self, pairs: Iterable[tuple[str, str]], default_tenant: str) -> None:
        self.default_tenant = validate_tenant(default_tenant)
        tenant_of: dict[str, str] = {}
        for tenant, key in pairs:
            if tenant_of.setdefault(key, tenant) != tenant:
                raise ValueError(f"one API key is given to two tenants ({tenant_of[key]!r} and {tenant!r})")
        self._keys = [(key.encode(), tenant) for key, tenant in tenant_of.items()]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        """Every key of MMSERVE_API_KEY, MMSERVE_API_KEYS and MMSERVE_API_KEYS_FILE (the file is read now)."""
        pairs: list[tuple[str, str]] = []
        if settings.api_key:
            pairs.append((single_key_tenant(settings.api_key), settings.api_key))
        if settings.api_keys is not None:
            pairs += parse_pairs(settings.api_keys.get_secret_value().split(","), "MMSERVE_API_KEYS")
        if settings.api_keys_file is not None:
            text = Path(settings.api_keys_file).read_text()
            pairs += parse_pairs(text.splitlines(), f"MMSERVE_API_KEYS_FILE ({settings.api_keys_file})")
        return cls(pairs, settings.tenant)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    @property
    def tenants(self) -> set[str]:
        return {tenant for _, tenant in self._keys}

    def tenant_for(self, token: str) -> str | None:
        """The tenant of `token`, or None. Every key is compared, in constant time, so timing tells nothing."""
        given = token.encode()
        found = None
        for key, tenant in self._keys:
            if hmac.compare_digest(given, key):
                found = tenant
        return found
