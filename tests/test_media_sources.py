"""Loading a MediaSource's bytes: inline data, data: URLs, file:// below a root, http via the guard."""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from mmserve.api.common.v1 import media_pb2
from mmserve.config import Settings
from mmserve.errors import FetchRefused, InvalidArgument, MediaTooLarge, RemoteFetchFailed
from services.encoder.media.budget import RequestBudget
from services.encoder.media.fetch import GuardedFetcher
from services.encoder.media.image import decode_image
from services.encoder.media.sources import load_source_bytes


def png_bytes(size: tuple[int, int] = (6, 4)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


class _Handler(BaseHTTPRequestHandler):
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        if self.path == "/img.png":
            data = png_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str]]]:
    _Handler.paths = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler.paths
    server.shutdown()
    server.server_close()


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"fetch_allow_loopback": True, "max_item_bytes": 4096}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def fetcher() -> AsyncIterator[GuardedFetcher]:
    f = GuardedFetcher(make_settings())
    yield f
    await f.aclose()


async def load(
    source: media_pb2.MediaSource,
    fetcher: GuardedFetcher,
    settings: Settings | None = None,
    budget: RequestBudget | None = None,
) -> bytes:
    settings = settings or make_settings()
    return await load_source_bytes(
        source,
        modality="image",
        settings=settings,
        budget=budget or RequestBudget.from_settings(settings),
        fetcher=fetcher,
    )


def url_source(url: str) -> media_pb2.MediaSource:
    return media_pb2.MediaSource(url=url)


# --- inline bytes and http --------------------------------------------------------------------


async def test_inline_bytes(fetcher: GuardedFetcher) -> None:
    data = png_bytes()
    settings = make_settings(max_request_media_bytes=len(data) + 10)
    budget = RequestBudget.from_settings(settings)
    assert await load(media_pb2.MediaSource(data=data), fetcher, settings, budget) == data
    assert budget.bytes_left == 10
    with pytest.raises(MediaTooLarge) as info:
        await load(media_pb2.MediaSource(data=data), fetcher, settings, budget)
    assert info.value.field == "source.data"
    assert info.value.metadata["setting"] == "max_request_media_bytes"


async def test_inline_bytes_over_item_cap(fetcher: GuardedFetcher) -> None:
    with pytest.raises(MediaTooLarge) as info:
        await load(media_pb2.MediaSource(data=b"\0" * 4097), fetcher)
    assert info.value.field == "source.data"
    assert "4 KiB" in info.value.message


async def test_http_url_goes_through_the_fetcher(fetcher: GuardedFetcher, http_server: tuple[str, list[str]]) -> None:
    base, paths = http_server
    assert await load(url_source(f"{base}/img.png"), fetcher) == png_bytes()
    with pytest.raises(RemoteFetchFailed) as info:
        await load(url_source(f"{base}/missing.png"), fetcher)
    assert info.value.field == "source.url"
    assert paths == ["/img.png", "/missing.png"]


async def test_http_url_guarded(http_server: tuple[str, list[str]]) -> None:
    base, paths = http_server
    settings = Settings()
    async with GuardedFetcher(settings) as strict:
        with pytest.raises(FetchRefused) as info:
            await load(url_source(f"{base}/img.png"), strict, settings)
    assert info.value.field == "source.url"
    assert paths == []


async def test_field_prefix_is_passed_through(fetcher: GuardedFetcher) -> None:
    settings = make_settings()
    with pytest.raises(InvalidArgument) as info:
        await load_source_bytes(
            url_source("ftp://example.com/a.png"),
            modality="image",
            settings=settings,
            budget=RequestBudget.from_settings(settings),
            fetcher=fetcher,
            field="items[2].source",
        )
    assert info.value.field == "items[2].source.url"


# --- data: URLs -------------------------------------------------------------------------------


async def test_data_url_png(fetcher: GuardedFetcher) -> None:
    data = png_bytes((7, 5))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    loaded = await load(url_source(url), fetcher)
    assert loaded == data
    settings = make_settings()
    image = decode_image(loaded, settings=settings, budget=RequestBudget.from_settings(settings))
    assert image.size == (7, 5)
    assert image.getpixel((0, 0)) == (10, 200, 30)


async def test_data_url_scheme_and_params_case_insensitive(fetcher: GuardedFetcher) -> None:
    url = "DATA:image/png;charset=binary;BASE64," + base64.b64encode(b"abc").decode()
    assert await load(url_source(url), fetcher) == b"abc"


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        ("aGVs!G8=", "invalid character at offset 4"),
        ("aGVs\nbG8=", "invalid character at offset 4"),
        ("aGVs bG8=", "invalid character at offset 4"),
        ("aGVs-G8_", "invalid character at offset 4"),
        ("aGVsbG8", "not a multiple of 4"),
        ("aG=sbG8=", "padding"),
    ],
)
async def test_data_url_strict_base64(fetcher: GuardedFetcher, payload: str, detail: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await load(url_source("data:image/png;base64," + payload), fetcher)
    assert type(info.value) is InvalidArgument
    assert info.value.field == "source.url"
    assert detail in info.value.message
    assert payload not in info.value.message


async def test_data_url_without_base64_refused(fetcher: GuardedFetcher) -> None:
    for url, detail in (
        ("data:image/png,%89PNG", "only base64 data URLs"),
        ("data:text/plain;charset=utf-8,hello", "only base64 data URLs"),
        ("data:image/png;base64", "no ','"),
    ):
        with pytest.raises(InvalidArgument) as info:
            await load(url_source(url), fetcher)
        assert info.value.field == "source.url"
        assert detail in info.value.message


async def test_data_url_size_checked_before_decoding(fetcher: GuardedFetcher) -> None:
    # 6000 base64 characters would decode to 4500 bytes > the 4096-byte cap. The payload is
    # also invalid base64, so a size error (not a base64 error) proves nothing was decoded.
    url = "data:image/png;base64," + "A" * 5996 + "!!!!"
    with pytest.raises(MediaTooLarge) as info:
        await load(url_source(url), fetcher)
    assert info.value.field == "source.url"
    assert info.value.metadata["setting"] == "max_item_bytes"
    # right at the cap it decodes fine
    exact = "data:application/octet-stream;base64," + base64.b64encode(b"\1" * 4096).decode()
    assert len(await load(url_source(exact), fetcher)) == 4096


async def test_data_url_charged_to_request_budget(fetcher: GuardedFetcher) -> None:
    settings = make_settings(max_request_media_bytes=5000)
    budget = RequestBudget.from_settings(settings)
    url = "data:image/png;base64," + base64.b64encode(b"\2" * 3000).decode()
    await load(url_source(url), fetcher, settings, budget)
    assert budget.bytes_left == 2000
    with pytest.raises(MediaTooLarge) as info:
        await load(url_source(url), fetcher, settings, budget)
    assert info.value.metadata["setting"] == "max_request_media_bytes"


# --- file:// ----------------------------------------------------------------------------------


@pytest.fixture
def file_tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "media root"
    (root / "sub").mkdir(parents=True)
    (root / "img.png").write_bytes(png_bytes())
    (root / "sub" / "inner.bin").write_bytes(b"inner")
    (root / "big.bin").write_bytes(b"\0" * 5000)
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"top secret")
    os.symlink(outside, root / "escape")
    os.symlink(root / "sub" / "inner.bin", root / "inside-link")
    os.symlink(tmp_path, root / "sub" / "parent-link")
    return {"root": root, "outside": outside, "tmp": tmp_path}


async def test_file_url_refused_without_root(fetcher: GuardedFetcher) -> None:
    with pytest.raises(FetchRefused) as info:
        await load(url_source("file:///etc/passwd"), fetcher)
    assert info.value.field == "source.url"
    assert "not enabled" in info.value.message


async def test_file_url_under_root(fetcher: GuardedFetcher, file_tree: dict[str, Path]) -> None:
    root = file_tree["root"]
    settings = make_settings(file_root=root)
    quoted = root.as_uri()  # percent-encodes the space
    assert await load(url_source(f"{quoted}/img.png"), fetcher, settings) == png_bytes()
    assert await load(url_source(f"{quoted}/sub/../sub/inner.bin"), fetcher, settings) == b"inner"
    assert await load(url_source(f"{quoted}/inside-link"), fetcher, settings) == b"inner"
    assert await load(url_source(f"file://localhost{root.as_uri()[7:]}/img.png"), fetcher, settings)


@pytest.mark.parametrize("relative", ["sub/../../secret.txt", "escape", "sub/parent-link/secret.txt", "../secret.txt"])
async def test_file_url_escape_refused(fetcher: GuardedFetcher, file_tree: dict[str, Path], relative: str) -> None:
    root = file_tree["root"]
    settings = make_settings(file_root=root)
    url = f"file://{root}/{relative}"
    with pytest.raises(FetchRefused) as info:
        await load(url_source(url), fetcher, settings)
    assert info.value.field == "source.url"
    assert "outside the server's file root" in info.value.message
    assert str(file_tree["tmp"]) not in str(info.value)
    assert "secret" not in str(info.value)


async def test_file_url_other_failures_do_not_leak_paths(fetcher: GuardedFetcher, file_tree: dict[str, Path]) -> None:
    root = file_tree["root"]
    settings = make_settings(file_root=root)
    cases: list[tuple[str, type[Exception], str]] = [
        (f"file://{root}/nope.png", InvalidArgument, "not found"),
        (f"file://{root}/sub", InvalidArgument, "not a regular file"),
        (f"file://{root}/big.bin", MediaTooLarge, "per-item limit"),
        (f"file://otherhost{root}/img.png", FetchRefused, "must not name a host"),
    ]
    for url, error, text in cases:
        with pytest.raises(error) as info:
            await load(url_source(url), fetcher, settings)
        message = str(info.value)
        assert text in message
        assert str(file_tree["tmp"]) not in message
        assert info.value.field == "source.url"  # type: ignore[attr-defined]


async def test_file_url_refuses_devices(fetcher: GuardedFetcher) -> None:
    settings = make_settings(file_root=Path("/dev"))
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as info:
        await load(url_source("file:///dev/zero"), fetcher, settings)
    assert time.monotonic() - started < 1.0
    assert "not a regular file" in info.value.message


# --- schemes and source kinds ------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://example.com/", "javascript:alert(1)", "img.png", "/etc/passwd"])
async def test_unknown_scheme(fetcher: GuardedFetcher, url: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await load(url_source(url), fetcher)
    assert info.value.field == "source.url"
    assert "accepted: http, https, data, file" in info.value.message


async def test_non_byte_sources_left_to_the_caller(fetcher: GuardedFetcher) -> None:
    embedding = media_pb2.MediaSource(embedding_id="mmemb-abc")
    frames = media_pb2.MediaSource(frames=media_pb2.VideoFrames(frames=[b"x"], fps=2.0))
    array = media_pb2.MediaSource()
    array.array.SetInParent()
    for source, kind in ((embedding, "embedding_id"), (frames, "frames"), (array, "array")):
        with pytest.raises(InvalidArgument) as info:
            await load(source, fetcher)
        assert info.value.field == f"source.{kind}"
    with pytest.raises(InvalidArgument) as info:
        await load(media_pb2.MediaSource(), fetcher)
    assert info.value.field == "source"
