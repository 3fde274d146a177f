"""The guarded fetcher against real sockets: a raw HTTP server on loopback, real DNS, real TLS.

Refusals must happen before any byte leaves: the local server's request log
and a socket audit hook (every `socket.connect` / `socket.getaddrinfo` in the
process) prove that nothing was sent and that the checked address is the one
connected to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmserve.config import Settings
from mmserve.errors import DeadlineExceeded, FetchRefused, MediaTooLarge, RemoteFetchFailed
from services.encoder.media.budget import RequestBudget
from services.encoder.media.fetch import GuardedFetcher, address_refusal, host_allowed

FIELD = "source.url"


# --- a tiny HTTP/1.1 server with scripted, possibly lying, responses ---------------------------


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]


Handler = Callable[[Seen, asyncio.StreamWriter], Awaitable[None]]


def head(status: int, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class LocalHTTP:
    """Serves scripted routes on 127.0.0.1 and ::1 (each its own port) and records every request."""

    routes: dict[str, Handler]
    ssl_context: ssl.SSLContext | None = None
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    port6: int = 0
    _servers: list[asyncio.Server] = field(default_factory=list)

    async def start(self) -> None:
        v4 = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        v6 = await asyncio.start_server(self._serve, "::1", 0, ssl=self.ssl_context)
        self._servers = [v4, v6]
        self.port = v4.sockets[0].getsockname()[1]
        self.port6 = v6.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode("latin-1").split()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if len(request_line) < 2:
                return
            seen = Seen(request_line[0], request_line[1], headers)
            self.seen.append(seen)
            handler = self.routes.get(seen.path.split("?")[0]) or self._prefix_route(seen.path)
            await handler(seen, writer)
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def _prefix_route(self, path: str) -> Handler:
        for prefix, handler in self.routes.items():
            if prefix.endswith("/") and path.startswith(prefix):
                return handler
        return not_found

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


async def not_found(seen: Seen, writer: asyncio.StreamWriter) -> None:
    writer.write(head(404, {"Content-Length": "9"}) + b"not found")


def body(data: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    async def handler(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(head(status, {"Content-Length": str(len(data)), **(headers or {})}) + data)

    return handler


def redirect(location: str | Callable[[], str], status: int = 302) -> Handler:
    async def handler(seen: Seen, writer: asyncio.StreamWriter) -> None:
        target = location() if callable(location) else location
        writer.write(head(status, {"Location": target, "Content-Length": "0"}))

    return handler


async def chain(seen: Seen, writer: asyncio.StreamWriter) -> None:
    """/chain/N redirects (relative Location) to /chain/N-1; /chain/0 is the media."""
    n = int(seen.path.rsplit("/", 1)[1])
    if n == 0:
        writer.write(head(200, {"Content-Length": "3"}) + b"end")
    else:
        writer.write(head(302, {"Location": f"/chain/{n - 1}", "Content-Length": "0"}))


async def slow_chain(seen: Seen, writer: asyncio.StreamWriter) -> None:
    """Like /chain/, each hop answering after 0.2 s: fine alone, too slow together."""
    await asyncio.sleep(0.2)
    n = int(seen.path.rsplit("/", 1)[1])
    location = f"/slow/{n - 1}" if n else None
    if location:
        writer.write(head(302, {"Location": location, "Content-Length": "0"}))
    else:
        writer.write(head(200, {"Content-Length": "3"}) + b"end")


def chunked(total: int, *, extra_headers: dict[str, str] | None = None) -> Handler:
    async def handler(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(head(200, {"Transfer-Encoding": "chunked", **(extra_headers or {})}))
        sent = 0
        while sent < total:
            piece = b"x" * min(256, total - sent)
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    return handler


async def lying_length(seen: Seen, writer: asyncio.StreamWriter) -> None:
    """Declares 10 bytes, then keeps sending."""
    writer.write(head(200, {"Content-Length": "10"}) + b"y" * 5000)


async def close_delimited(seen: Seen, writer: asyncio.StreamWriter) -> None:
    """No length at all: the body ends when the connection closes."""
    writer.write(head(200, {"Connection": "close"}))
    for _ in range(20):
        writer.write(b"z" * 256)
        await writer.drain()


async def huge_declared(seen: Seen, writer: asyncio.StreamWriter) -> None:
    writer.write(head(200, {"Content-Length": str(10**12)}))
    await writer.drain()
    await asyncio.sleep(30)  # never sends the body; the fetcher must not wait for it


async def trickle(seen: Seen, writer: asyncio.StreamWriter) -> None:
    writer.write(head(200, {"Content-Length": "1000"}))
    for _ in range(1000):
        writer.write(b"t")
        await writer.drain()
        await asyncio.sleep(0.05)


# --- audit of the process's own sockets -------------------------------------------------------


class SocketAudit:
    """Records socket.connect targets and getaddrinfo hosts while active (hook installed once)."""

    installed = False
    active: SocketAudit | None = None

    def __init__(self) -> None:
        self.connects: list[str] = []
        self.lookups: list[str] = []

    @classmethod
    def hook(cls, event: str, args: tuple[object, ...]) -> None:
        audit = cls.active
        if audit is None:
            return
        if event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple):
                audit.connects.append(str(address[0]))
        elif event == "socket.getaddrinfo":
            audit.lookups.append(str(args[0]))


@pytest.fixture
def sockets() -> Iterator[SocketAudit]:
    if not SocketAudit.installed:
        sys.addaudithook(SocketAudit.hook)
        SocketAudit.installed = True
    audit = SocketAudit()
    SocketAudit.active = audit
    try:
        yield audit
    finally:
        SocketAudit.active = None


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[LocalHTTP]:
    srv = LocalHTTP(routes={})
    srv.routes.update(
        {
            "/ok": body(b"hello"),
            "/bytes800": body(b"b" * 800),
            "/404": body(b"gone", status=404),
            "/500": body(b"boom", status=500),
            "/gzip": body(b"\x1f\x8b" + b"0" * 20, headers={"Content-Encoding": "gzip"}),
            "/redirect-private": redirect("http://10.0.0.1/"),
            "/redirect-metadata": redirect("http://169.254.169.254/latest/meta-data"),
            "/redirect-file": redirect("file:///etc/passwd"),
            "/redirect-data": redirect("data:image/png;base64,AAAA"),
            "/redirect-javascript": redirect("javascript:alert(1)"),
            "/redirect-gopher": redirect("gopher://example.com/"),
            "/redirect-mapped": redirect(lambda: f"http://[::ffff:127.0.0.1]:{srv.port}/ok"),
            "/redirect-ip": redirect(lambda: f"http://127.0.0.1:{srv.port}/ok", status=307),
            "/chain/": chain,
            "/slow/": slow_chain,
            "/chunked-big": chunked(5000),
            "/chunked-800": chunked(800),
            "/te-and-small-cl": chunked(5000, extra_headers={"Content-Length": "10"}),
            "/lying-cl": lying_length,
            "/close-delimited": close_delimited,
            "/huge-cl": huge_declared,
            "/trickle": trickle,
        }
    )
    await srv.start()
    yield srv
    await srv.stop()


def loopback_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"fetch_allow_loopback": True, "max_item_bytes": 1000}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def fetcher() -> AsyncIterator[GuardedFetcher]:
    """Loopback allowed (test switch on), 1000-byte item cap."""
    f = GuardedFetcher(loopback_settings())
    yield f
    await f.aclose()


@pytest.fixture
async def strict_fetcher() -> AsyncIterator[GuardedFetcher]:
    """Production defaults: the test switch off."""
    f = GuardedFetcher(Settings(fetch_allow_loopback=False))
    yield f
    await f.aclose()


def budget(max_bytes: int = 10**9) -> RequestBudget:
    return RequestBudget(max_bytes=max_bytes, max_pixels=10**9)


async def fetch(f: GuardedFetcher, url: str, b: RequestBudget | None = None) -> bytes:
    return await f.fetch(url, modality="image", budget=b or budget(), field=FIELD)


# --- refusals: nothing is sent -----------------------------------------------------------------


async def test_loopback_refused_when_switch_off(strict_fetcher: GuardedFetcher, server: LocalHTTP, sockets: SocketAudit) -> None:
    for url in (
        server.url("/ok"),
        f"http://[::1]:{server.port6}/ok",
        f"http://localhost:{server.port}/ok",
        f"http://127.1.2.3:{server.port}/ok",
    ):
        with pytest.raises(FetchRefused) as info:
            await fetch(strict_fetcher, url)
        assert info.value.field == FIELD
    assert server.seen == []
    assert sockets.connects == []


async def test_localhost_message_does_not_reveal_the_address(strict_fetcher: GuardedFetcher) -> None:
    with pytest.raises(FetchRefused) as info:
        await fetch(strict_fetcher, "http://localhost/")
    assert "localhost" in info.value.message
    assert "not publicly routable" in info.value.message
    assert "127.0.0.1" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://10.0.0.1/", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://100.64.0.1/", "CGNAT"),
        ("http://[::ffff:127.0.0.1]/", "IPv4-mapped form of a loopback"),
        ("http://[::ffff:10.0.0.1]/", "IPv4-mapped form of a private"),
        ("http://[64:ff9b::a00:1]/", "NAT64 form of a private"),
        ("http://[64:ff9b:1::a00:1]/", "local-use NAT64"),
        ("http://[2002:a00:1::]/", "6to4 form of a private"),
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "Teredo"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://0.1.2.3/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[ff02::1]/", "multicast"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fc00::1]/", "private"),
        ("http://192.168.1.1:8080/", "private"),
        ("http://240.0.0.1/", "reserved"),
    ],
)
async def test_non_global_addresses_refused(
    strict_fetcher: GuardedFetcher, fetcher: GuardedFetcher, sockets: SocketAudit, url: str, reason: str
) -> None:
    for f in (strict_fetcher, fetcher):  # the loopback switch never opens these
        started = time.monotonic()
        with pytest.raises(FetchRefused) as info:
            await fetch(f, url)
        assert time.monotonic() - started < 1.0
        assert info.value.field == FIELD
        assert reason in info.value.message
    assert sockets.connects == []


async def test_switch_on_allows_only_plain_loopback(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    assert await fetch(fetcher, server.url("/ok")) == b"hello"
    assert await fetch(fetcher, f"http://[::1]:{server.port6}/ok") == b"hello"
    with pytest.raises(FetchRefused):
        await fetch(fetcher, f"http://[::ffff:127.0.0.1]:{server.port}/ok")
    assert server.paths() == ["/ok", "/ok"]


@pytest.mark.parametrize(
    ("path", "target"),
    [("/redirect-private", "10.0.0.1"), ("/redirect-metadata", "169.254.169.254")],
)
async def test_redirect_to_internal_address_refused(
    fetcher: GuardedFetcher, server: LocalHTTP, sockets: SocketAudit, path: str, target: str
) -> None:
    with pytest.raises(FetchRefused) as info:
        await fetch(fetcher, server.url(path))
    assert info.value.field == FIELD
    assert sockets.connects == ["127.0.0.1"]  # the first hop only; the target was never dialled
    assert target not in sockets.connects


async def test_redirect_to_mapped_loopback_refused(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    with pytest.raises(FetchRefused):
        await fetch(fetcher, server.url("/redirect-mapped"))
    assert server.paths() == ["/redirect-mapped"]  # the same server behind ::ffff: got nothing


async def test_redirect_to_file_url_refused(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    with pytest.raises(FetchRefused) as info:
        await fetch(fetcher, server.url("/redirect-file"))
    assert "'file'" in info.value.message
    assert info.value.field == FIELD


@pytest.mark.parametrize("path", ["/redirect-data", "/redirect-javascript", "/redirect-gopher"])
async def test_redirect_to_any_other_scheme_refused(fetcher: GuardedFetcher, server: LocalHTTP, path: str) -> None:
    """data: and javascript: (a scheme, no host) used to escape as an httpx error: an encoder 500."""
    with pytest.raises(FetchRefused) as info:
        await fetch(fetcher, server.url(path))
    assert info.value.field == FIELD


async def test_three_relative_redirects_followed_fourth_refused(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    assert await fetch(fetcher, server.url("/chain/3")) == b"end"
    assert server.paths() == ["/chain/3", "/chain/2", "/chain/1", "/chain/0"]
    server.seen.clear()
    with pytest.raises(FetchRefused) as info:
        await fetch(fetcher, server.url("/chain/4"))
    assert "more than 3 redirects" in info.value.message
    assert server.paths() == ["/chain/4", "/chain/3", "/chain/2", "/chain/1"]


async def test_redirect_limit_is_configurable(server: LocalHTTP) -> None:
    async with GuardedFetcher(loopback_settings(fetch_max_redirects=0)) as f:
        with pytest.raises(FetchRefused):
            await fetch(f, server.url("/chain/1"))
    assert server.paths() == ["/chain/1"]


# --- the pinned connection ------------------------------------------------------------------


async def test_connects_to_checked_address_with_original_host_header(
    fetcher: GuardedFetcher, server: LocalHTTP, sockets: SocketAudit
) -> None:
    url = f"http://localhost:{server.port}/ok?x=1"
    assert await fetch(fetcher, url) == b"hello"
    assert len(server.seen) == 1
    assert server.seen[0].headers["host"] == f"localhost:{server.port}"
    assert server.seen[0].path == "/ok?x=1"
    assert sockets.connects == ["127.0.0.1"]
    # exactly one name lookup; anything else resolved was the numeric address itself
    assert sockets.lookups.count("localhost") == 1
    assert {h for h in sockets.lookups if h != "localhost"} <= {"127.0.0.1"}


async def test_no_proxy_from_environment(fetcher: GuardedFetcher, server: LocalHTTP, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    monkeypatch.setenv("http_proxy", "http://10.9.9.9:3128")
    monkeypatch.setenv("ALL_PROXY", "http://10.9.9.9:3128")
    async with GuardedFetcher(loopback_settings()) as f:
        assert await fetch(f, server.url("/ok")) == b"hello"


# --- size caps --------------------------------------------------------------------------------


async def test_chunked_body_over_cap(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    with pytest.raises(MediaTooLarge) as info:
        await fetch(fetcher, server.url("/chunked-big"))
    assert info.value.field == FIELD
    assert "per-item limit of 1000 bytes" in info.value.message


async def test_small_content_length_with_chunked_body_over_cap(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    with pytest.raises(MediaTooLarge):
        await fetch(fetcher, server.url("/te-and-small-cl"))


async def test_lying_small_content_length_never_returns_more(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    assert await fetch(fetcher, server.url("/lying-cl")) == b"y" * 10


async def test_close_delimited_body_over_cap(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    with pytest.raises(MediaTooLarge):
        await fetch(fetcher, server.url("/close-delimited"))


async def test_huge_content_length_refused_early(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    started = time.monotonic()
    with pytest.raises(MediaTooLarge) as info:
        await fetch(fetcher, server.url("/huge-cl"))
    assert time.monotonic() - started < 1.0
    assert info.value.metadata["setting"] == "max_item_bytes"


@pytest.mark.parametrize("path", ["/bytes800", "/chunked-800"])
async def test_request_budget_spans_items(fetcher: GuardedFetcher, server: LocalHTTP, path: str) -> None:
    shared = budget(max_bytes=1500)
    assert len(await fetch(fetcher, server.url(path), shared)) == 800
    assert shared.bytes_left == 700
    with pytest.raises(MediaTooLarge) as info:
        await fetch(fetcher, server.url(path), shared)
    assert info.value.field == FIELD
    assert info.value.metadata["setting"] == "max_request_media_bytes"
    assert "per-request limit" in info.value.message


async def test_compressed_response_refused(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    with pytest.raises(RemoteFetchFailed) as info:
        await fetch(fetcher, server.url("/gzip"))
    assert "gzip" in info.value.message
    assert server.seen[0].headers["accept-encoding"] == "identity"


# --- deadline, remote failures ----------------------------------------------------------------


async def test_trickling_server_hits_the_deadline(server: LocalHTTP) -> None:
    async with GuardedFetcher(loopback_settings(fetch_timeout_image_s=0.5)) as f:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            await fetch(f, server.url("/trickle"))
        elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 1.5
    assert info.value.field == FIELD
    assert "0.5 s" in info.value.message


async def test_deadline_covers_all_hops(server: LocalHTTP) -> None:
    async with GuardedFetcher(loopback_settings(fetch_timeout_image_s=0.5)) as f:
        assert await fetch(f, server.url("/slow/1")) == b"end"  # 2 hops, 0.4 s
        with pytest.raises(DeadlineExceeded):
            await fetch(f, server.url("/slow/3"))  # 4 hops, 0.8 s


async def test_deadline_depends_on_modality(server: LocalHTTP) -> None:
    settings = loopback_settings(fetch_timeout_image_s=0.3, fetch_timeout_video_s=5.0)
    async with GuardedFetcher(settings) as f:
        url = server.url("/slow/1")
        with pytest.raises(DeadlineExceeded):
            await f.fetch(url, modality="image", budget=budget(), field=FIELD)
        assert await f.fetch(url, modality="video", budget=budget(), field=FIELD) == b"end"


@pytest.mark.parametrize("status", [404, 500])
async def test_remote_error_status(fetcher: GuardedFetcher, server: LocalHTTP, status: int) -> None:
    with pytest.raises(RemoteFetchFailed) as info:
        await fetch(fetcher, server.url(f"/{status}"))
    assert info.value.field == FIELD
    assert f"HTTP {status}" in info.value.message
    assert info.value.metadata["http_status"] == str(status)
    assert server.paths() == [f"/{status}"]  # no silent retry


async def test_connection_refused_is_remote_failure(fetcher: GuardedFetcher, server: LocalHTTP) -> None:
    port = server.port
    await server.stop()
    with pytest.raises(RemoteFetchFailed) as info:
        await fetch(fetcher, f"http://127.0.0.1:{port}/ok")
    assert "could not connect" in info.value.message


async def test_unresolvable_host_is_remote_failure(fetcher: GuardedFetcher) -> None:
    with pytest.raises(RemoteFetchFailed) as info:
        await fetch(fetcher, "http://no-such-host.invalid/x.png")
    assert info.value.field == FIELD


# --- allowlist --------------------------------------------------------------------------------


async def test_allowlist(server: LocalHTTP, sockets: SocketAudit) -> None:
    async with GuardedFetcher(loopback_settings(fetch_allowed_hosts="localhost")) as f:
        assert await fetch(f, f"http://localhost:{server.port}/ok") == b"hello"
        with pytest.raises(FetchRefused) as info:
            await fetch(f, server.url("/ok"))  # 127.0.0.1 is not on the list
        assert "allowed hosts" in info.value.message
        # a redirect off the list is refused too
        with pytest.raises(FetchRefused):
            await fetch(f, f"http://localhost:{server.port}/redirect-ip")
    assert server.paths() == ["/ok", "/redirect-ip"]


def test_allowlist_matching() -> None:
    allowed = ["images.example.com", ".cdn.example.net"]
    assert host_allowed("images.example.com", allowed)
    assert host_allowed("IMAGES.example.com.", allowed)
    assert host_allowed("a.b.cdn.example.net", allowed)
    assert not host_allowed("cdn.example.net", allowed)
    assert not host_allowed("evilcdn.example.net", allowed)
    assert not host_allowed("images.example.com.evil.org", allowed)


def test_address_policy_accepts_public_forms() -> None:
    for text in ("8.8.8.8", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::"):
        assert address_refusal(ipaddress.ip_address(text)) is None


# --- TLS: SNI and certificate checks use the hostname, the socket uses the checked IP ----------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and two leaf certificates (for localhost, and for another name)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=mmserve test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )
    for name in ("localhost", "other.test"):
        (d / f"{name}.ext").write_text(
            f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
            "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\n"
        )
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return {"ca": d / "ca.pem", "dir": d}


async def _tls_server(tls_files: dict[str, Path], cert_name: str, sni_seen: list[str | None]) -> LocalHTTP:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    d = tls_files["dir"]
    ctx.load_cert_chain(d / f"{cert_name}.pem", d / f"{cert_name}.key")
    ctx.sni_callback = lambda _sock, name, _ctx: sni_seen.append(name)
    srv = LocalHTTP(routes={"/ok": body(b"secure")}, ssl_context=ctx)
    await srv.start()
    return srv


async def test_https_sni_and_certificate_use_hostname(tls_files: dict[str, Path], sockets: SocketAudit) -> None:
    sni: list[str | None] = []
    srv = await _tls_server(tls_files, "localhost", sni)
    trust = ssl.create_default_context(cafile=str(tls_files["ca"]))
    try:
        async with GuardedFetcher(loopback_settings(), ssl_context=trust) as f:
            assert await fetch(f, f"https://localhost:{srv.port}/ok") == b"secure"
    finally:
        await srv.stop()
    assert sni == ["localhost"]
    assert sockets.connects == ["127.0.0.1"]
    assert srv.seen[0].headers["host"] == f"localhost:{srv.port}"


async def test_https_certificate_for_another_name_fails(tls_files: dict[str, Path]) -> None:
    srv = await _tls_server(tls_files, "other.test", [])
    trust = ssl.create_default_context(cafile=str(tls_files["ca"]))
    try:
        async with GuardedFetcher(loopback_settings(), ssl_context=trust) as f:
            with pytest.raises(RemoteFetchFailed) as info:
                await fetch(f, f"https://localhost:{srv.port}/ok")
    finally:
        await srv.stop()
    assert "TLS" in info.value.message
    assert srv.seen == []


async def test_https_untrusted_certificate_fails_by_default(tls_files: dict[str, Path]) -> None:
    srv = await _tls_server(tls_files, "localhost", [])
    try:
        async with GuardedFetcher(loopback_settings()) as f:
            with pytest.raises(RemoteFetchFailed):
                await fetch(f, f"https://localhost:{srv.port}/ok")
    finally:
        await srv.stop()
    assert srv.seen == []


# --- the loud warning -------------------------------------------------------------------------


async def test_loopback_switch_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="services.encoder.media.fetch"):
        async with GuardedFetcher(Settings(fetch_allow_loopback=False)):
            pass
        assert not caplog.records
        async with GuardedFetcher(loopback_settings()):
            pass
    assert len(caplog.records) == 1
    assert caplog.records[0].levelname == "WARNING"
    assert "TEST switch" in caplog.records[0].getMessage()
