"""`mmserve up`, the real command: the whole stack comes up, answers through the OpenAI SDK, and Ctrl-C stops all of it.

It runs with no MMSERVE_REDIS_URL, so it starts its own redis-server; after
SIGINT it must exit 0 and leave no child behind (encoder, decoder, gateway,
redis-server), checked by pid and by port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from mmserve.api.decoder.v1 import decoder_service_pb2 as dec
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as dec_grpc
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc
from mmserve.api.encoder.v1 import encoder_service_pb2_grpc as enc_grpc
from mmserve.launcher import resolve_command
from mmserve.localredis import free_port
from mmserve.rpc.health import check
from tests.conftest import CACHE_DIR
from tests.support import rpc_error

pytestmark = pytest.mark.slow  # `mmserve up` as a process, stopped by Ctrl-C

UP_LINE = "mmserve is up"


@dataclass
class Up:
    """A running `mmserve up` and everything it printed."""

    proc: subprocess.Popen[str]
    ports: dict[str, int]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def output(self) -> str:
        return "\n".join(self.lines)


def children(pid: int) -> dict[int, str]:
    """Direct children of `pid` and their command lines, from /proc."""
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError, IndexError):
            continue
    return out


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def launch_up(*args: str, **extra_env: str) -> Iterator[Up]:
    """`mmserve up ARGS` on free ports, in its own process group (as a terminal runs it), output captured.

    Its Redis persists (as users run it) in a fresh folder unless `MMSERVE_REDIS_DATA_DIR` is given:
    never in the shared cache dir, where another test's `mmserve up` may hold the lock.
    """
    ports = {"gateway": free_port(), "encoder": free_port(), "decoder": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSERVE_")}
    own_data = tempfile.mkdtemp(prefix="mmserve-up-redis-") if "MMSERVE_REDIS_DATA_DIR" not in extra_env else None
    env.update(
        MMSERVE_GATEWAY_PORT=str(ports["gateway"]), MMSERVE_ENCODER_PORT=str(ports["encoder"]),
        MMSERVE_DECODER_PORT=str(ports["decoder"]), MMSERVE_CACHE_DIR=str(CACHE_DIR), PYTHONUNBUFFERED="1",
        **({"MMSERVE_REDIS_DATA_DIR": own_data} if own_data else {}), **extra_env,
    )  # fmt: skip
    proc = subprocess.Popen(
        resolve_command(["mmserve", "up", *args]), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    running = Up(proc, ports)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            running.lines.append(line.rstrip("\n"))
            if UP_LINE in line:
                running.ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield running
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        reader.join(5)
        if own_data:
            shutil.rmtree(own_data, ignore_errors=True)


@pytest.fixture
def up(tiny_checkpoint: Path) -> Iterator[Up]:
    with launch_up() as running:
        yield running


def assert_grpc_ports_need_the_stack_token(up: Up) -> None:
    """`mmserve up` made a random service token: its gRPC ports refuse callers without it, but health is open."""
    for role, call in (("encoder", lambda ch: enc_grpc.EncoderServiceStub(ch).GetModelInfo(enc.GetModelInfoRequest(), timeout=10)),
                       ("decoder", lambda ch: dec_grpc.DecoderServiceStub(ch).ListModels(dec.ListModelsRequest(), timeout=10))):  # fmt: skip
        with grpc.insecure_channel(f"127.0.0.1:{up.ports[role]}") as channel:
            code, err = rpc_error(call, channel)
            assert code == grpc.StatusCode.UNAUTHENTICATED and err.reason == "SERVICE_TOKEN_INVALID", role
        assert check(f"127.0.0.1:{up.ports[role]}")


def wait_up(up: Up, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not up.ready.wait(0.5):
        if up.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"mmserve up did not come up (exit {up.proc.poll()}):\n{up.output()[-4000:]}")


@pytest.mark.parametrize("ctrl_c", ["to-process", "to-group"])
def test_mmserve_up_serves_and_ctrl_c_stops_everything(up: Up, ctrl_c: str) -> None:
    """SIGINT to `up` alone (it must stop its children itself), or to the whole group (a terminal's Ctrl-C)."""
    wait_up(up)
    base = f"http://127.0.0.1:{up.ports['gateway']}/v1"
    assert base in next(line for line in up.lines if UP_LINE in line)

    kids = children(up.proc.pid)
    role_of = {pid: "redis-server" if "redis-server" in cmd else cmd.split(" ")[-1] for pid, cmd in kids.items()}
    assert sorted(role_of.values()) == ["decoder", "encoder", "gateway", "redis-server"], kids
    redis_cmd = next(cmd for cmd in kids.values() if "redis-server" in cmd)  # redis shows "redis-server host:port"
    redis_port = int(redis_cmd.rsplit(":", 1)[1]) if "--port" not in redis_cmd else int(redis_cmd.split("--port ")[1].split()[0])
    ports = [*up.ports.values(), redis_port]
    assert all(listening(p) for p in ports)

    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="mmserve-tiny-random", messages=[{"role": "user", "content": "Hello"}], max_completion_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens == 8
    models = httpx.get(f"{base}/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["mmserve-tiny-random"] and models[0]["random_weights"] is True
    assert any("RANDOM WEIGHTS" in line for line in up.lines)
    assert_grpc_ports_need_the_stack_token(up)

    start = time.monotonic()
    if ctrl_c == "to-group":
        os.killpg(up.proc.pid, signal.SIGINT)
    else:
        up.proc.send_signal(signal.SIGINT)
    try:
        code = up.proc.wait(25)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"mmserve up still running 25 s after SIGINT:\n{up.output()[-4000:]}") from None
    took = time.monotonic() - start
    assert code == 0, up.output()[-4000:]
    assert took < 20, f"stopping took {took:.1f}s"
    assert [role_of[pid] for pid in kids if alive(pid)] == [], "children left running"
    assert [p for p in ports if listening(p)] == [], "ports still served"
    assert "Traceback" not in up.output()
