"""The gRPC contract from another language: the Node.js client in clients/node against a real Omni stack.

clients/node/smoke.js loads protos/ at run time with @grpc/proto-loader (no
generated code), encodes a PNG and a float32 time series, reads them back,
streams Generate over both by reference, and checks a NOT_FOUND with its
google.rpc details. Here we run it as CI would (`node clients/node/smoke.js
--encoder ... --decoder ...`), check its JSON summary, check that the
services logged the request ids it sent, and check from the Python stubs
that what Node stored is what Python sees.

Node is required: CI installs it, so a missing `node` fails this test rather
than skipping it. `npm ci` runs when clients/node/node_modules is missing or
does not match the pinned versions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mmserve.api.common.v1 import media_pb2
from mmserve.api.decoder.v1 import decoder_service_pb2 as dpb
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc
from mmserve.api.encoder.v1 import encoder_service_pb2 as epb
from tests.conftest import RunningService, Stack
from tests.support import encoder_stub

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIR = ROOT / "clients" / "node"
SMOKE = CLIENT_DIR / "smoke.js"
MIN_NODE_MAJOR = 18


def _which_or_fail(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"`{name}` is not on PATH: the Node.js client test needs Node.js >= {MIN_NODE_MAJOR} with npm "
            "(CI installs it; locally e.g. `apt-get install nodejs npm` or https://nodejs.org)."
        )
    return found


@pytest.fixture(scope="module")
def node() -> str:
    exe = _which_or_fail("node")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    major = int(version.lstrip("v").split(".")[0])
    assert major >= MIN_NODE_MAJOR, f"Node.js {version} is too old for clients/node (needs >= {MIN_NODE_MAJOR})"
    return exe


def _installed_matches_lock() -> bool:
    """True when node_modules holds exactly the pinned @grpc packages (else `npm ci` is needed)."""
    pinned = json.loads((CLIENT_DIR / "package.json").read_text())["dependencies"]
    for name, version in pinned.items():
        manifest = CLIENT_DIR / "node_modules" / name / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text()).get("version") != version:
            return False
    return True


@pytest.fixture(scope="module")
def node_modules(node: str) -> Path:
    """clients/node/node_modules, installed from package-lock.json by `npm ci` when missing or stale."""
    if not _installed_matches_lock():
        npm = _which_or_fail("npm")
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=CLIENT_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"`npm ci` in clients/node failed:\n{result.stdout}\n{result.stderr}"
        assert _installed_matches_lock(), "`npm ci` ran but node_modules does not hold the pinned @grpc packages"
    return CLIENT_DIR / "node_modules"


def run_smoke(node: str, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run smoke.js as CI does; return the process and its one-line JSON summary."""
    result = subprocess.run([node, str(SMOKE.relative_to(ROOT)), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"smoke.js must print exactly one JSON line on stdout, got:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result, json.loads(lines[0])


def logged(service: RunningService, request_id: str, rpc: str, outcome: str = "OK", wait: float = 5.0) -> str:
    """The service's summary log line for `rpc` under `request_id` (text or JSON logs), waiting a little for it."""
    deadline = time.monotonic() + wait
    while True:
        for line in service.process.log_text().splitlines():
            if line.startswith("{"):  # MMSERVE_JSON_LOGS
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("request_id") == request_id and record.get("msg") == f"{rpc} {outcome}":
                    return line
            elif f"[{request_id}]" in line and f": {rpc} {outcome} " in line:
                return line
        if time.monotonic() > deadline:
            return ""
        time.sleep(0.1)


@pytest.fixture
def request_prefix() -> str:
    return f"pytest-node-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def kept_ids(omni_stack: Stack) -> Iterator[list[str]]:
    """Embedding ids the test asked smoke.js to keep; deleted afterwards."""
    ids: list[str] = []
    yield ids
    with encoder_stub(omni_stack.encoder.target) as stub:
        for emb_id in ids:
            stub.DeleteEmbedding(epb.DeleteEmbeddingRequest(id=emb_id), timeout=30)


def test_node_client_smoke(node: str, node_modules: Path, omni_stack: Stack, request_prefix: str, kept_ids: list[str]) -> None:
    """smoke.js passes against the Omni stack; its summary, the service logs and the Python view agree."""
    result, summary = run_smoke(
        node,
        "--encoder",
        omni_stack.encoder.target,
        "--decoder",
        omni_stack.decoder.target,
        "--request-id",
        request_prefix,
        "--timeout-ms",
        "120000",
        "--keep",
    )
    assert result.returncode == 0, (
        f"smoke.js failed (exit {result.returncode}):\nstderr:\n{result.stderr}\nsummary: {json.dumps(summary, indent=1)}"
    )
    assert summary["ok"] is True and "error" not in summary
    assert summary["family"] == "qwen2_5_omni"

    # Ids: the client uuids it chose, derived from the request id prefix we gave.
    image, series = summary["image"], summary["time_series"]
    assert image["id"] == f"node-img-{request_prefix}"
    assert series["id"] == f"node-ts-{request_prefix}"
    kept_ids.extend([image["id"], series["id"]])
    assert series["shape"] == [400, 2]

    # Token counts: both media made tokens, and the image's count is its merged patch grid.
    assert image["token_count"] >= 1 and series["token_count"] >= 1
    t, h, w = image["grid_thw"]
    assert image["token_count"] * image["spatial_merge_size"] ** 2 == t * h * w
    gen = summary["generate"]
    assert gen["text"].strip(), f"empty completion: {gen!r}"
    assert gen["finish_reason"] in {"FINISH_REASON_STOP", "FINISH_REASON_LENGTH"}
    usage = gen["usage"]
    assert usage["cached_media"] == 2
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert gen["media_tokens"] == image["token_count"] + series["token_count"]
    assert usage["prompt_tokens"] >= gen["text_only_prompt_tokens"] + gen["media_tokens"]

    # NOT_FOUND with rich details, decoded by Node from grpc-status-details-bin.
    missing = summary["not_found"]
    assert missing["code"] == "NOT_FOUND"
    assert missing["uuid"] in missing["details"]
    assert missing["error_info"]["reason"] == "EMBEDDING_NOT_FOUND"
    assert missing["error_info"]["domain"] == "mmserve.dev"
    assert missing["error_info"]["metadata"]["missing"] == missing["uuid"]
    assert missing["bad_request"]["field_violations"][0]["field"] == "messages[0].content[1]"

    # x-request-id reached the services: one summary log line per call, under the id Node sent.
    ids = summary["request_ids"]
    assert ids["generate"] == f"{request_prefix}-generate"
    line = logged(omni_stack.decoder, ids["generate"], "Generate")
    assert line, f"the decoder logged no Generate under {ids['generate']}:\n{omni_stack.decoder.process.log_text()[-3000:]}"
    assert "cached_media=2" in line or '"cached_media": 2' in line, line  # this is the media call, not the text-only one
    assert logged(omni_stack.decoder, ids["generate-not-found"], "Generate", "NOT_FOUND")
    assert logged(omni_stack.encoder, ids["encode"], "Encode"), f"the encoder logged no Encode under {ids['encode']}"

    # What Node stored is what Python sees, and Python's greedy Generate over it gives Node's text.
    with encoder_stub(omni_stack.encoder.target) as stub:
        got_image = stub.GetEmbedding(epb.GetEmbeddingRequest(id=image["id"]), timeout=30).embedding
        got_series = stub.GetEmbedding(epb.GetEmbeddingRequest(id=series["id"]), timeout=30).embedding
    assert (got_image.modality, got_image.token_count, got_image.client_uuid) == (media_pb2.MODALITY_IMAGE, image["token_count"], True)
    assert list(got_image.image.source_size) == [96, 64]
    assert (got_series.modality, got_series.token_count) == (media_pb2.MODALITY_TIME_SERIES, series["token_count"])
    assert (got_series.time_series.num_samples, got_series.time_series.num_channels) == (400, 2)

    request = dpb.GenerateRequest(
        messages=[
            dpb.ChatMessage(
                role=dpb.ROLE_USER,
                content=[
                    dpb.ContentPart(text="Describe the picture and the signal."),
                    dpb.ContentPart(media=media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, uuid=image["id"])),
                    dpb.ContentPart(
                        media=media_pb2.MediaInput(
                            modality=media_pb2.MODALITY_TIME_SERIES, source=media_pb2.MediaSource(embedding_id=series["id"])
                        )
                    ),
                ],
            )
        ],
        sampling=dpb.SamplingParams(temperature=0.0, max_tokens=12),
    )
    with grpc.insecure_channel(omni_stack.decoder.target) as channel:
        responses = list(decoder_service_pb2_grpc.DecoderServiceStub(channel).Generate(request, timeout=120))
    assert "".join(r.text for r in responses) == gen["text"]
    assert responses[-1].usage.prompt_tokens == usage["prompt_tokens"]


def test_node_client_fails_loudly(node: str, node_modules: Path, omni_stack: Stack) -> None:
    """A failed check is a non-zero exit with the reason on stderr and in the JSON summary."""
    # The encoder answers on the "decoder" address: DecoderService is not there.
    result, summary = run_smoke(
        node, "--encoder", omni_stack.encoder.target, "--decoder", omni_stack.encoder.target, "--timeout-ms", "30000"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert summary["ok"] is False and summary["stage"] == "generate"
    assert "UNIMPLEMENTED" in summary["error"] and "UNIMPLEMENTED" in result.stderr
    # It cleaned up what it had encoded before failing.
    with encoder_stub(omni_stack.encoder.target) as stub, pytest.raises(grpc.RpcError) as info:
        stub.GetEmbedding(epb.GetEmbeddingRequest(id=summary["image"]["id"]), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    result, summary = run_smoke(node, "--encoder", "127.0.0.1:1", "--decoder", omni_stack.decoder.target, "--timeout-ms", "1500")
    assert result.returncode == 1
    assert summary["stage"] == "connect" and "could not connect to the encoder at" in summary["error"]

    result = subprocess.run([node, str(SMOKE), "--encoder", "x"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--decoder are required" in result.stderr
