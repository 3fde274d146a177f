"""Precompute for later: encode media ahead of time, then chat about it by id alone.

For every modality the Qwen2.5-Omni tiny thinker takes (image, video, audio,
time series): an embedding made ahead through the encoder's gRPC API (media
behind a real HTTP URL) and then named only by its uuid in a chat request
must give the same greedy answer as sending the media inline, without an
Encode call and without fetching the media again. Then the same through the
real `mmserve encode` CLI: local files and a URL, tab-separated and --json
output, --uuid, and a failing source that does not stop the others.
"""

from __future__ import annotations

import base64
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mmserve.api.common.v1 import media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.launcher import resolve_command
from tests.conftest import MediaServer, Stack
from tests.support import encoder_stub, png_bytes, scrape
from tests.test_equivalence_modalities import mp4_bytes, npy_bytes, wav_bytes

OMNI = "tiny:qwen2_5_omni-tiny"
MAX_TOKENS = 16
RATE = 100.0  # Hz, of every time series here
ENCODE_OK = 'mmserve_requests_total{outcome="OK",rpc="Encode",service="encoder"}'
MODALITY = {
    "image": media_pb2.MODALITY_IMAGE,
    "video": media_pb2.MODALITY_VIDEO,
    "audio": media_pb2.MODALITY_AUDIO,
    "time_series": media_pb2.MODALITY_TIME_SERIES,
}
#: LLM tokens of the media below, derived from the model's processors (not read back from the server):
EXPECTED_TOKENS = {
    # 96x64 -> smart_resize to 84x56 (multiples of 28) -> 6x4 patches of 14 -> / merge 2x2 = 6.
    "image": 6,
    # 8 frames at 4 fps = 2 s, sampled at 2 fps -> 4 frames -> 2 temporal patches; each frame is
    # scaled up to the video processor's min_pixels (100352) -> 392x280 -> 28x20 patches -> 140 tokens each.
    "video": 280,
    # 2 s at 16 kHz -> 200 mel frames -> conv stride 2 -> 100 -> pooling 2 -> 50.
    "audio": 50,
    # 600 samples x 2 channels at 100 Hz, 1 s (100-sample) patches -> 6 patches -> merge 2 -> 3 per channel.
    "time_series": 6,
}


@dataclass(frozen=True)
class Media:
    """One media file: its bytes, how it is named and served, how a chat part carries it."""

    modality: str
    data: bytes
    ext: str
    mime: str

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"

    def inline_part(self) -> dict[str, Any]:
        """The OpenAI content part carrying the media itself (a data URL)."""
        if self.modality == "image":
            return {"type": "image_url", "image_url": {"url": self.data_url()}}
        if self.modality == "video":
            return {"type": "video_url", "video_url": {"url": self.data_url()}}
        if self.modality == "audio":
            return {"type": "input_audio", "input_audio": {"data": base64.b64encode(self.data).decode(), "format": "wav"}}
        return {"type": "time_series_url", "time_series_url": {"url": self.data_url(), "sampling_rate": RATE}}


def make_media(modality: str, seed: int) -> Media:
    """Small media of `modality`; different seeds give different content."""
    if modality == "image":
        return Media(modality, png_bytes(96, 64, seed=seed), ".png", "image/png")
    if modality == "video":
        return Media(modality, mp4_bytes(frames=8, fps=4, width=96, height=64, seed=seed), ".mp4", "video/mp4")
    if modality == "audio":
        return Media(modality, wav_bytes(2.0, seed=seed), ".wav", "audio/wav")
    return Media(modality, npy_bytes(600, 2, seed=seed), ".npy", "application/octet-stream")


def ref_part(modality: str, ref: str, *, part_type: str | None = None) -> dict[str, Any]:
    """A media part with a null payload naming a stored embedding (client uuid or mmemb- content id)."""
    kind = part_type or {"image": "image_url", "video": "video_url", "audio": "input_audio", "time_series": "time_series_url"}[modality]
    return {"type": kind, kind: None, "uuid": ref}


@pytest.fixture(scope="module")
def stack(inprocess_omni_stack: Stack) -> Stack:
    """Encoder, decoder and gateway of the Omni thinker (+ time-series adapter), in the test process."""
    return inprocess_omni_stack


def encode_calls(stack: Stack) -> float:
    """Successful Encode RPCs the encoder has served."""
    return scrape(stack.encoder.metrics_url).get(ENCODE_OK, 0.0)


def all_encode_calls(stack: Stack) -> float:
    """Encode RPCs the encoder has served, whatever their outcome."""
    samples = scrape(stack.encoder.metrics_url)
    return sum(v for k, v in samples.items() if k.startswith("mmserve_requests_total{") and 'rpc="Encode"' in k)


def ask(stack: Stack, content: list[dict[str, Any]]) -> tuple[str, int]:
    """Greedy answer and prompt token count of a one-message chat, through the OpenAI SDK."""
    reply = stack.client().chat.completions.create(
        model="", messages=[{"role": "user", "content": content}], temperature=0, max_completion_tokens=MAX_TOKENS
    )
    assert reply.usage is not None
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens


def assert_informative(text: str) -> None:
    assert len(set(text)) > 5, f"degenerate output {text!r}: the comparison could not fail"


def item_for(media: Media, *, url: str, uuid: str = "") -> media_pb2.MediaInput:
    item = media_pb2.MediaInput(modality=MODALITY[media.modality], source=media_pb2.MediaSource(url=url), uuid=uuid)
    if media.modality == "time_series":
        item.time_series.sampling_rate = RATE
    return item


# --- ahead through gRPC, later by uuid ------------------------------------------------------------


@pytest.mark.parametrize(("modality", "seed"), [("image", 101), ("video", 102), ("audio", 103), ("time_series", 104)])
def test_encode_ahead_then_chat_by_uuid(stack: Stack, media_server: MediaServer, modality: str, seed: int) -> None:
    """An embedding encoded ahead from a URL answers by uuid exactly as the inline media does, with no Encode call and no fetch."""
    media = make_media(modality, seed)
    path = f"/precompute/ahead-{modality}{media.ext}"
    url = media_server.add(path, media.data, content_type=media.mime)
    uuid = f"ahead-{modality}"
    with encoder_stub(stack.encoder.target) as stub:
        result = stub.Encode(pb.EncodeRequest(items=[item_for(media, url=url, uuid=uuid)])).results[0]
    desc = result.embedding
    assert not result.cached
    assert (desc.id, desc.client_uuid, desc.modality) == (uuid, True, MODALITY[modality])
    assert desc.token_count == EXPECTED_TOKENS[modality]
    assert media_server.hits.count(path) == 1

    question = {"type": "text", "text": "Describe it."}
    hits, encodes = len(media_server.hits), all_encode_calls(stack)
    by_uuid, prompt_by_uuid = ask(stack, [ref_part(modality, uuid), question])
    assert all_encode_calls(stack) == encodes  # the decoder read the store; the encoder never saw the request
    assert len(media_server.hits) == hits  # and nothing was fetched again
    if modality == "audio":  # both audio part types refer the same way
        assert ask(stack, [ref_part(modality, uuid, part_type="audio_url"), question]) == (by_uuid, prompt_by_uuid)
        assert all_encode_calls(stack) == encodes

    before_inline = encode_calls(stack)
    inline, prompt_inline = ask(stack, [media.inline_part(), question])
    assert encode_calls(stack) == before_inline + 1  # the inline request does go through Encode: the checks above can fail
    assert_informative(inline)
    assert by_uuid == inline
    assert prompt_by_uuid == prompt_inline


def test_answer_depends_on_the_media(stack: Stack, media_server: MediaServer) -> None:
    """Two different images stored ahead give different answers by uuid: the by-uuid comparisons above are not vacuous."""
    answers = []
    with encoder_stub(stack.encoder.target) as stub:
        for seed in (111, 112):
            media = make_media("image", seed)
            url = media_server.add(f"/precompute/differ-{seed}.png", media.data, content_type=media.mime)
            stub.Encode(pb.EncodeRequest(items=[item_for(media, url=url, uuid=f"differ-{seed}")]))
            answers.append(ask(stack, [ref_part("image", f"differ-{seed}"), {"type": "text", "text": "Describe it."}])[0])
    assert answers[0] != answers[1], answers


def test_unknown_uuid_is_404_naming_it(stack: Stack) -> None:
    """A reference to nothing stored is a 404 naming every missing id, and still no Encode call."""
    import openai

    encodes = all_encode_calls(stack)
    with pytest.raises(openai.NotFoundError) as info:
        ask(stack, [ref_part("video", "never-stored-1"), ref_part("audio", "never-stored-2"), {"type": "text", "text": "?"}])
    error = info.value.response.json()["error"]
    assert "never-stored-1" in error["message"] and "never-stored-2" in error["message"]
    assert error["param"] == "messages[0].content[0]"
    assert all_encode_calls(stack) == encodes


# --- the `mmserve encode` CLI ------------------------------------------------------------------------


def run_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `mmserve encode` console script against the stack's encoder."""
    argv = resolve_command(["mmserve", "encode"])
    return subprocess.run([*argv, "--target", stack.encoder.target, *args], capture_output=True, text=True, timeout=300, check=False)


def parse_rows(stdout: str) -> list[dict[str, Any]]:
    """The tab-separated output: id, modality, tokens, cached, source (one line per item)."""
    rows = []
    for line in stdout.splitlines():
        ident, modality, tokens, cached, source = line.split("\t")
        rows.append({"id": ident, "modality": modality, "tokens": int(tokens), "cached": cached == "True", "source": source})
    return rows


def write(tmp_path: Path, name: str, media: Media) -> str:
    path = tmp_path / f"{name}{media.ext}"
    path.write_bytes(media.data)
    return str(path)


@pytest.fixture(scope="module")
def cli_media() -> dict[str, Media]:
    return {m: make_media(m, seed) for m, seed in (("image", 201), ("video", 202), ("audio", 203), ("time_series", 204))}


def test_cli_encodes_files_and_urls_then_chat_by_their_ids(
    stack: Stack, media_server: MediaServer, tmp_path: Path, cli_media: dict[str, Media]
) -> None:
    """`mmserve encode` reports each source's id, modality and token count; chatting by those ids needs no Encode and no fetch."""
    files = {m: write(tmp_path, f"local-{m}", media) for m, media in cli_media.items()}
    remote = make_media("image", 205)
    url = media_server.add("/precompute/cli-remote.png", remote.data, content_type=remote.mime)

    first = run_cli(stack, files["image"], files["video"], files["audio"], url)
    assert first.returncode == 0, first.stderr
    series = run_cli(stack, "--sampling-rate", str(RATE), files["time_series"])  # a rate makes .npy/.wav time series
    assert series.returncode == 0, series.stderr
    rows = parse_rows(first.stdout) + parse_rows(series.stdout)
    sources = [files["image"], files["video"], files["audio"], url, files["time_series"]]
    modalities = ["image", "video", "audio", "image", "time_series"]
    assert [r["source"] for r in rows] == sources
    assert [r["modality"] for r in rows] == modalities
    assert [r["tokens"] for r in rows] == [EXPECTED_TOKENS[m] for m in modalities]
    assert not any(r["cached"] for r in rows)
    assert all(r["id"].startswith("mmemb-") for r in rows)
    assert len({r["id"] for r in rows}) == 5
    assert media_server.hits.count("/precompute/cli-remote.png") == 1

    with encoder_stub(stack.encoder.target) as stub:  # what the CLI printed is what the store holds
        for row in rows:
            desc = stub.GetEmbedding(pb.GetEmbeddingRequest(id=row["id"])).embedding
            assert (desc.modality, desc.token_count, desc.client_uuid) == (MODALITY[row["modality"]], row["tokens"], False)

    question = {"type": "text", "text": "Compare them."}
    by_id = [ref_part(m, r["id"]) for m, r in zip(modalities, rows, strict=True)]
    hits, encodes = len(media_server.hits), all_encode_calls(stack)
    answer, prompt_tokens = ask(stack, [*by_id, question])
    assert all_encode_calls(stack) == encodes and len(media_server.hits) == hits

    inline = [
        cli_media["image"].inline_part(),
        cli_media["video"].inline_part(),
        cli_media["audio"].inline_part(),
        remote.inline_part(),
        cli_media["time_series"].inline_part(),
    ]
    want, want_prompt = ask(stack, [*inline, question])
    assert_informative(want)
    assert (answer, prompt_tokens) == (want, want_prompt)

    again = run_cli(stack, files["image"], url)  # same content and options: served from the store
    assert again.returncode == 0, again.stderr
    assert [(r["id"], r["cached"]) for r in parse_rows(again.stdout)] == [(rows[0]["id"], True), (rows[3]["id"], True)]


def test_cli_json_output(stack: Stack, media_server: MediaServer, tmp_path: Path) -> None:
    """--json prints one object per item with id, modality, tokens, cached, expires_at and source."""
    image, audio = make_media("image", 211), make_media("audio", 212)
    local = write(tmp_path, "json-image", image)
    url = media_server.add("/precompute/json-audio.wav", audio.data, content_type=audio.mime)
    done = run_cli(stack, "--json", local, url)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [set(r) for r in rows] == [{"id", "modality", "tokens", "cached", "expires_at", "source"}] * 2
    assert [(r["modality"], r["tokens"], r["cached"], r["source"]) for r in rows] == [
        ("image", EXPECTED_TOKENS["image"], False, local),
        ("audio", EXPECTED_TOKENS["audio"], False, url),
    ]
    assert all(r["id"].startswith("mmemb-") and r["expires_at"].endswith("Z") for r in rows)

    encodes = all_encode_calls(stack)
    answer, _ = ask(
        stack,
        [ref_part("image", rows[0]["id"]), ref_part("audio", rows[1]["id"], part_type="audio_url"), {"type": "text", "text": "What?"}],
    )
    assert all_encode_calls(stack) == encodes
    assert answer == ask(stack, [image.inline_part(), audio.inline_part(), {"type": "text", "text": "What?"}])[0]


def test_cli_uuid_names_the_embedding(stack: Stack, tmp_path: Path) -> None:
    """--uuid gives the source at its position that id (the others keep content ids); chat by that uuid works."""
    video, series = make_media("video", 221), make_media("time_series", 222)
    clip = write(tmp_path, "named-clip", video)
    done = run_cli(stack, "--uuid", "demo-clip", clip)
    assert done.returncode == 0, done.stderr
    (row,) = parse_rows(done.stdout)
    assert (row["id"], row["modality"], row["tokens"], row["cached"]) == ("demo-clip", "video", EXPECTED_TOKENS["video"], False)

    sensor = write(tmp_path, "named-sensor", series)
    image = write(tmp_path, "unnamed-image", make_media("image", 223))
    done = run_cli(stack, "--sampling-rate", str(RATE), "--uuid", "demo-sensor", sensor, image)
    assert done.returncode == 0, done.stderr
    named, unnamed = parse_rows(done.stdout)
    assert (named["id"], named["modality"]) == ("demo-sensor", "time_series")
    assert unnamed["id"].startswith("mmemb-") and unnamed["modality"] == "image"

    with encoder_stub(stack.encoder.target) as stub:
        desc = stub.GetEmbedding(pb.GetEmbeddingRequest(id="demo-clip")).embedding
    assert desc.client_uuid and desc.video.frame_timestamps  # stored under the uuid, with its timing

    encodes = all_encode_calls(stack)
    answer, _ = ask(stack, [ref_part("video", "demo-clip"), ref_part("time_series", "demo-sensor"), {"type": "text", "text": "Why?"}])
    assert all_encode_calls(stack) == encodes
    assert answer == ask(stack, [video.inline_part(), series.inline_part(), {"type": "text", "text": "Why?"}])[0]


def test_cli_failing_source_is_reported_and_the_others_still_succeed(stack: Stack, tmp_path: Path) -> None:
    """A .png that is not an image: an error naming it on stderr, exit status 1, the other sources encoded."""
    bad = tmp_path / "not-really.png"
    bad.write_bytes(b"this is plain text, not a PNG\n" * 10)
    good_audio, good_image = make_media("audio", 231), make_media("image", 232)
    audio = write(tmp_path, "fine-audio", good_audio)
    image = write(tmp_path, "fine-image", good_image)
    done = run_cli(stack, audio, str(bad), image)
    assert done.returncode == 1
    rows = parse_rows(done.stdout)
    assert [(r["source"], r["modality"], r["tokens"]) for r in rows] == [
        (audio, "audio", EXPECTED_TOKENS["audio"]),
        (image, "image", EXPECTED_TOKENS["image"]),
    ]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"{bad}: INVALID_ARGUMENT: ")
    assert "image" in errors[0].lower()
    assert "Traceback" not in done.stderr
    with encoder_stub(stack.encoder.target) as stub:  # the good ones really are stored
        for row in rows:
            assert stub.GetEmbedding(pb.GetEmbeddingRequest(id=row["id"])).embedding.token_count == row["tokens"]
