"""The guarded fetcher: http(s) media downloads that cannot be turned against the server.

A URL in a request is attacker-controlled, and the encoder usually sits inside
a private network next to Redis, cloud metadata endpoints and admin ports.
For every hop (the first URL and each redirect target) the fetcher:

1. accepts only http and https, and the optional hostname allowlist;
2. resolves the host once and refuses if ANY address is not globally
   routable, looking through IPv4-mapped, NAT64, 6to4 and Teredo forms;
3. connects to exactly an address it checked: the request URL is rewritten to
   the IP, the original `Host` header is sent, and for https the hostname goes
   to TLS as SNI and for certificate verification. No second DNS lookup
   happens anywhere, so DNS rebinding between check and connect is impossible.

Redirects are followed by hand (at most `fetch_max_redirects`, each re-checked),
one total deadline covers all hops, and the body is capped while it streams,
whatever Content-Length claims. There are no retries; a failure is reported
with the request field it belongs to.

The address policy is hand-written on top of `ipaddress` because
`is_global` differs between Python versions (e.g. multicast counts as global,
embedded IPv4 forms are not looked through before 3.13) and the policy must
not change with the interpreter.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence

import httpx

from mmserve.config import Settings
from mmserve.errors import DeadlineExceeded, FetchRefused, InvalidArgument, RemoteFetchFailed
from mmserve.modality import BY_NAME
from services.encoder.media.budget import RequestBudget, item_too_large

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: embeds an IPv4 in the last 32 bits
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local use, never global
_V4_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_V4_SHARED = ipaddress.ip_network("100.64.0.0/10")  # CGNAT, RFC 6598
_MAX_ADDRESSES_TRIED = 4
_USER_AGENT = "mmserve-fetch/1"


def _ipv4_refusal(ip: ipaddress.IPv4Address, *, allow_loopback: bool) -> str | None:
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    if ip in _V4_THIS_NETWORK:
        return "unspecified"
    if ip in _V4_SHARED:
        return "shared (CGNAT)"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


def address_refusal(ip: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why the fetcher must not connect to `ip` (a short category), or None if it may.

    IPv6 forms that carry an IPv4 address are judged by that IPv4 address, so
    ::ffff:10.0.0.1, 64:ff9b::a00:1 and 2002:a00:1:: are all "private".
    `allow_loopback` (the test switch) admits 127/8 and ::1 only, never an
    embedded loopback such as ::ffff:127.0.0.1.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return _ipv4_refusal(ip, allow_loopback=allow_loopback)
    if ip.ipv4_mapped is not None:
        return _embedded(ip.ipv4_mapped, "IPv4-mapped")
    if ip in _NAT64_WELL_KNOWN:
        return _embedded(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64")
    if ip in _NAT64_LOCAL_USE:
        return "local-use NAT64"
    if ip.sixtofour is not None:
        return _embedded(ip.sixtofour, "6to4")
    if ip.teredo is not None:
        server, client = ip.teredo
        return _embedded(server, "Teredo server") or _embedded(client, "Teredo")
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link-local"
    if ip.is_site_local:
        return "site-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


def _embedded(v4: ipaddress.IPv4Address, form: str) -> str | None:
    reason = _ipv4_refusal(v4, allow_loopback=False)
    return f"{form} form of a {reason}" if reason else None


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Allowlist match: exact names, and ".example.com" for any subdomain of example.com."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("."):
            if host.endswith(entry) and len(host) > len(entry):
                return True
        elif host == entry:
            return True
    return False


class GuardedFetcher:
    """Fetches http(s) media for the encoder; one per process, shared by all requests."""

    def __init__(self, settings: Settings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        """`ssl_context` overrides the default CA bundle (a private CA; the tests' own CA)."""
        self._settings = settings
        self._allow_loopback = settings.fetch_allow_loopback
        if self._allow_loopback:
            logger.warning(
                "!!! MMSERVE_FETCH_ALLOW_LOOPBACK is ON: media URLs may reach 127.0.0.0/8 and ::1 on this "
                "machine. This is a TEST switch; never enable it in production. !!!"
            )
        # trust_env=False: no proxies (nor CA/netrc settings) from the environment, since a
        # proxy would do its own DNS lookup and defeat the address check.
        # No keep-alive: the pool is keyed by (scheme, IP, port), so a pooled TLS connection
        # verified for one hostname could otherwise carry a request for another name that
        # resolves to the same IP.
        self._client = httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            verify=ssl_context if ssl_context is not None else True,
            timeout=httpx.Timeout(None),  # one total deadline per item, enforced in fetch()
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"User-Agent": _USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        """Close the shared HTTP client."""
        await self._client.aclose()

    async def __aenter__(self) -> GuardedFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def fetch(self, url: str, *, modality: str, budget: RequestBudget, field: str) -> bytes:
        """Download `url` through the guard; errors name `field`.

        Raises FetchRefused (guard said no, nothing was sent), MediaTooLarge,
        RemoteFetchFailed (remote 4xx/5xx, connection failure), DeadlineExceeded.
        """
        if modality not in BY_NAME:
            raise ValueError(f"unknown modality {modality!r}")  # a caller bug, not a client error
        limit_s = BY_NAME[modality].fetch_timeout_s(self._settings)
        try:
            async with asyncio.timeout(limit_s):
                return await self._fetch_hops(url, budget=budget, field=field)
        except (TimeoutError, httpx.TimeoutException):
            raise DeadlineExceeded(
                f"fetching the {modality.replace('_', ' ')} took longer than its {limit_s:g} s deadline",
                field=field,
                metadata={"limit_s": f"{limit_s:g}"},
            ) from None

    async def _fetch_hops(self, url: str, *, budget: RequestBudget, field: str) -> bytes:
        try:
            current = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise InvalidArgument("is not a valid URL", field=field) from None
        max_redirects = self._settings.fetch_max_redirects
        for hop in range(max_redirects + 1):
            addresses = await self._check_hop(current, field=field)
            response = await self._send_pinned(current, addresses, field=field)
            try:
                if response.status_code in _REDIRECT_CODES:
                    location = response.headers.get("Location")
                    if not location:
                        raise RemoteFetchFailed(
                            f"the server answered HTTP {response.status_code} without a Location",
                            field=field,
                            metadata={"http_status": str(response.status_code)},
                        )
                    if hop == max_redirects:
                        raise FetchRefused(f"more than {max_redirects} redirects", field=field)
                    try:
                        current = current.join(location)
                    except (httpx.InvalidURL, TypeError):
                        raise RemoteFetchFailed("the server redirected to an invalid URL", field=field) from None
                    continue
                return await self._read_body(response, budget=budget, field=field)
            finally:
                await response.aclose()
        raise AssertionError("unreachable")  # the loop either returns or raises

    async def _check_hop(self, url: httpx.URL, *, field: str) -> list[IPAddress]:
        """Apply the guard to one hop; returns the checked addresses to connect to."""
        if url.scheme not in ("http", "https"):
            raise FetchRefused(
                f"refused a URL with scheme '{url.scheme or '(none)'}' (only http and https are fetched)",
                field=field,
            )
        host = url.raw_host.decode("ascii")
        if not host:
            raise InvalidArgument("URL has no host", field=field)
        allowed = self._settings.fetch_allowed_hosts
        if allowed and not (host_allowed(host, allowed) or host_allowed(url.host, allowed)):
            raise FetchRefused(f"host '{url.host}' is not in the server's list of allowed hosts", field=field)
        port = url.port or (443 if url.scheme == "https" else 80)
        literal = _ip_literal(host)
        addresses = [literal] if literal is not None else await self._resolve(host, port, field=field)
        for ip in addresses:
            reason = address_refusal(ip, allow_loopback=self._allow_loopback)
            if reason is not None:
                logger.info("fetch guard refused %s:%s -> %s (%s)", host, port, ip, reason)
                if literal is not None:
                    raise FetchRefused(f"refused to fetch from a {reason} address", field=field)
                # Do not tell the caller which internal address a name has.
                raise FetchRefused(f"host '{url.host}' resolves to an address that is not publicly routable", field=field)
        return addresses

    async def _resolve(self, host: str, port: int, *, field: str) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError):
            raise RemoteFetchFailed(f"could not resolve host '{host}'", field=field) from None
        addresses: list[IPAddress] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise RemoteFetchFailed(f"could not resolve host '{host}'", field=field)
        return addresses

    async def _send_pinned(self, url: httpx.URL, addresses: list[IPAddress], *, field: str) -> httpx.Response:
        """Send GET to the first checked address that accepts a connection, Host/SNI unchanged.

        Falling back to the next checked address on a refused connection is what
        every HTTP client does for multi-address hosts; it never resends a
        request that reached a server.
        """
        extensions: dict[str, str] = {}
        if url.scheme == "https":
            # httpcore (1.0.x, _async/connection.py `_connect`) passes this as
            # `server_hostname` to start_tls, which anyio hands to
            # `SSLContext.wrap_bio(server_hostname=...)`; with httpx's default context
            # (check_hostname=True, CERT_REQUIRED) OpenSSL then uses this name both for
            # SNI and for matching the certificate, not the IP in the URL.
            extensions["sni_hostname"] = url.raw_host.decode("ascii")
        headers = {"Host": url.netloc.decode("ascii")}
        last_error: httpx.TransportError | None = None
        for ip in addresses[:_MAX_ADDRESSES_TRIED]:
            request = self._client.build_request("GET", url.copy_with(host=str(ip)), headers=headers, extensions=extensions)
            try:
                return await self._client.send(request, stream=True)
            except httpx.ConnectError as exc:
                last_error = exc
                continue
            except httpx.TimeoutException:
                raise
            except httpx.TransportError as exc:
                raise _transport_failure(url, exc, field) from None
            except httpx.InvalidURL:
                # httpx builds a redirect's next request even without following it, and fails on a
                # Location with a scheme and no host (data:, javascript:): a redirect we refuse anyway.
                raise FetchRefused("the server redirected to a URL that is not http or https", field=field) from None
        assert last_error is not None
        raise _transport_failure(url, last_error, field) from None

    async def _read_body(self, response: httpx.Response, *, budget: RequestBudget, field: str) -> bytes:
        status = response.status_code
        if status >= 400:
            raise RemoteFetchFailed(f"the server answered HTTP {status}", field=field, metadata={"http_status": str(status)})
        if status >= 300:
            raise RemoteFetchFailed(
                f"the server answered HTTP {status} instead of the media",
                field=field,
                metadata={"http_status": str(status)},
            )
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # We asked for identity; decompressing would let a small body expand without bound.
            raise RemoteFetchFailed(f"the server sent Content-Encoding '{encoding}' although none was requested", field=field)
        item_limit = self._settings.max_item_bytes
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit():
            size = int(declared)
            if size > item_limit:
                raise item_too_large(item_limit, field)
            budget.ensure_bytes(size, field)
        body = bytearray()
        try:
            async for chunk in response.aiter_raw():
                if len(body) + len(chunk) > item_limit:
                    raise item_too_large(item_limit, field)
                budget.take_bytes(len(chunk), field)
                body += chunk
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as exc:
            raise _transport_failure(response.request.url, exc, field, while_reading=True) from None
        return bytes(body)


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _transport_failure(url: httpx.URL, exc: httpx.TransportError, field: str, *, while_reading: bool = False) -> RemoteFetchFailed:
    """A connection-level failure, without leaking the exception text (it may hold addresses)."""
    logger.info("fetch of host %s failed: %r", url.host, exc)
    if _is_tls_error(exc):
        what = "the TLS handshake failed (certificate not trusted or not valid for the host)"
    elif while_reading:
        what = "the connection broke while reading the body"
    elif isinstance(exc, httpx.ConnectError):
        what = "could not connect"
    else:
        what = "the server did not answer with valid HTTP"
    return RemoteFetchFailed(f"fetching from the media host failed: {what}", field=field)


def _is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
