"""Replicas coming and going (issue 13, item 8): two encoders and two decoders as processes behind one gateway.

The gateway reaches the decoders, and the decoders and gateway the encoders, through `ipv4:a,b`
targets (what DNS gives for a scaled service). Under a client loop (text, fresh images so the
encoder works, streams) one decoder and one encoder are SIGKILLed: no request may fail, except a
stream already past its first token. The killed decoder is then restarted on its port: while it
loads (health NOT_SERVING) it must get no call, and once SERVING it must get calls within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from mmserve.launcher import ServiceProcess
from mmserve.localredis import LocalRedis, free_port
from mmserve.rpc.health import check, wait_serving
from mmserve.stack import wait_http_ok
from tests.conftest import CACHE_DIR, TINY
from tests.support import data_url, png_bytes, scrape

pytestmark = pytest.mark.slow  # replica processes killed, restarted and drained under load

REJOIN_LIMIT_S = 5.0  # the issue asks for ~2 s on a quiet machine; 2 shared cores get some slack


@dataclass
class Replica:
    """One service process on a fixed gRPC port (so it can be restarted where the targets point)."""

    role: str
    port: int
    env: dict[str, str]
    logs: Path
    process: ServiceProcess | None = None
    metrics_port: int = 0
    starts: int = 0
    host: str = "127.0.0.1"  # any of 127.0.0.0/8: replicas on 127.0.0.1 and 127.0.0.2 can share a port

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Replica:
        self.metrics_port, self.starts = free_port(self.host), self.starts + 1
        env = {
            **self.env,
            "MMSERVE_HOST": self.host,
            f"MMSERVE_{self.role.upper()}_PORT": str(self.port),
            "MMSERVE_METRICS_PORT": str(self.metrics_port),
        }
        log_path = self.logs / f"{self.role}-{self.host}-{self.port}-{self.starts}.log"
        self.process = ServiceProcess(self.role, env, log_path=log_path).start()
        return self

    def wait(self, timeout: float = 300) -> None:
        assert self.process is not None
        try:
            wait_serving(self.target, timeout=timeout, alive=self.process.alive)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{self.role} did not start: {exc}\n{self.process.log_text()[-3000:]}") from exc

    def kill(self) -> None:
        """SIGKILL (no graceful shutdown: the calls in flight die with it)."""
        assert self.process is not None and self.process.proc is not None
        os.kill(self.process.proc.pid, signal.SIGKILL)
        self.process.proc.wait(10)
        self.process.stop()

    def in_flight(self) -> int:
        """Calls this process is serving now (its in-flight gauge)."""
        samples = scrape(f"http://{self.host}:{self.metrics_port}/metrics")
        return int(sum(v for k, v in samples.items() if k.startswith("mmserve_requests_in_flight{")))

    def kill_when_busy(self, within_s: float = 10.0) -> int:
        """SIGKILL as soon as a call is in flight here (at most `within_s` from now); returns the calls seen in flight."""
        deadline, busy = time.monotonic() + within_s, 0
        while time.monotonic() < deadline and not (busy := self.in_flight()):
            time.sleep(0.005)
        self.kill()
        return busy

    def generate_calls(self) -> int:
        """Generate calls this process has answered, by its request metric (any outcome)."""
        return self.calls("Generate")

    def calls(self, rpc: str) -> int:
        """Calls of `rpc` (Generate, Encode...) this process has answered, by its request metric (any outcome)."""
        samples = scrape(f"http://{self.host}:{self.metrics_port}/metrics")
        return int(sum(v for k, v in samples.items() if k.startswith("mmserve_requests_total{") and f'rpc="{rpc}"' in k))


@dataclass
class Replicas:
    encoders: list[Replica]
    decoders: list[Replica]
    gateway: ServiceProcess
    base_url: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def replicas(module_redis: LocalRedis, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    logs = tmp_path_factory.mktemp("replicas")
    encoder_ports, decoder_ports = [free_port(), free_port()], [free_port(), free_port()]
    encoder_target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in encoder_ports)
    env = {
        "MMSERVE_MODEL": f"tiny:{TINY}", "MMSERVE_CACHE_DIR": str(CACHE_DIR), "MMSERVE_REDIS_URL": module_redis.url,
        "MMSERVE_HOST": "127.0.0.1", "MMSERVE_SHUTDOWN_GRACE_S": "2", "MMSERVE_ENCODER_TARGET": encoder_target,
        "MMSERVE_FETCH_ALLOW_LOOPBACK": "true", "MMSERVE_MAX_RUNNING_REQUESTS": "4", "MMSERVE_LOG_LEVEL": "INFO",
        "PYTHONFAULTHANDLER": "1",  # a process that hangs on SIGTERM is sent SIGABRT: its threads' stacks land in its log
    }  # fmt: skip
    encoders = [Replica("encoder", p, env, logs) for p in encoder_ports]
    decoders = [Replica("decoder", p, env, logs) for p in decoder_ports]
    gateway_port = free_port()
    gateway = ServiceProcess("gateway", {
        **env, "MMSERVE_GATEWAY_PORT": str(gateway_port),
        "MMSERVE_DECODER_TARGET": "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in decoder_ports),
    }, log_path=logs / "gateway.log")  # fmt: skip
    with running(encoders, decoders, gateway, gateway_port):
        yield Replicas(encoders, decoders, gateway, f"http://127.0.0.1:{gateway_port}/v1")


@contextmanager
def running(encoders: list[Replica], decoders: list[Replica], gateway: ServiceProcess, gateway_port: int) -> Iterator[None]:
    """Every replica started together and waited for together (the loads overlap), then the gateway; all stopped after."""
    try:
        for replica in [*encoders, *decoders]:
            replica.start()
        for replica in [*encoders, *decoders]:
            replica.wait()
        gateway.start()
        wait_http_ok(f"http://127.0.0.1:{gateway_port}/health", timeout=60, alive=gateway.alive)
        yield
    finally:
        gateway.stop()
        for replica in [*decoders, *encoders]:
            if replica.process is not None:
                replica.process.stop()


@dataclass
class Outcome:
    """One chat request: whether it succeeded, and for a stream how many content chunks came before an error."""

    index: int
    streamed: bool
    error: str = ""
    chunks_before_error: int = 0
    finished_at: float = 0.0


def one_chat(client: openai.OpenAI, index: int, *, seed_base: int) -> Outcome:
    """Request `index`: every third streamed, every other one with a never-seen image (so an encoder runs)."""
    streamed = index % 3 == 2
    content: list[dict[str, object]] = [{"type": "text", "text": f"Describe item {index}."}]
    if index % 2 == 1:
        image = data_url(png_bytes(48, 48, seed=seed_base + index))
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    messages = [{"role": "user", "content": content}]
    outcome = Outcome(index, streamed)
    try:
        if streamed:
            stream = client.chat.completions.create(model="", messages=messages, max_completion_tokens=12, temperature=0, stream=True)  # type: ignore[arg-type]
            for chunk in stream:
                if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                    outcome.chunks_before_error += 1
        else:
            reply = client.chat.completions.create(model="", messages=messages, max_completion_tokens=12, temperature=0)  # type: ignore[arg-type]
            assert reply.choices[0].finish_reason in {"stop", "length"}
    except (openai.APIError, AssertionError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.finished_at = time.monotonic()
    return outcome


def visible_failures(outcomes: list[Outcome]) -> list[Outcome]:
    """Failures a client may not see: any non-streamed one, and streams that failed before their first token."""
    return [o for o in outcomes if o.error and (not o.streamed or o.chunks_before_error == 0)]


def test_sigkill_one_decoder_and_one_encoder_under_load(replicas: Replicas) -> None:
    client = replicas.client()
    total, kill_after = 36, 10
    done = threading.Event()
    completed: list[Outcome] = []

    def run(index: int) -> Outcome:
        outcome = one_chat(client, index, seed_base=10_000)
        completed.append(outcome)
        if len(completed) >= kill_after:
            done.set()
        return outcome

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(run, i) for i in range(total)]
        assert done.wait(180), "the stack did not answer"
        before_kill = [replicas.decoders[0].generate_calls(), replicas.decoders[1].generate_calls()]
        encoder_busy = replicas.encoders[0].kill_when_busy()
        decoder_busy = replicas.decoders[0].kill_when_busy()
        outcomes = [f.result(timeout=300) for f in futures]
    print(f"killed an encoder with {encoder_busy} and a decoder with {decoder_busy} calls in flight")
    assert decoder_busy, "the decoder was never seen serving a call: the kill proved nothing"
    assert not visible_failures(outcomes), [o for o in outcomes if o.error]
    assert all(o.error == "" for o in outcomes if not o.streamed)
    assert min(before_kill) > 0, f"both decoders should have had traffic before the kill: {before_kill}"
    assert replicas.decoders[1].generate_calls() > before_kill[1], "the surviving decoder took the rest"


def test_restarted_decoder_gets_no_call_while_loading_and_calls_soon_after_serving(replicas: Replicas) -> None:
    """Restart the killed decoder on its port under load: 0 calls while NOT_SERVING, calls within seconds of SERVING."""
    restarted = replicas.decoders[0]
    if restarted.process is not None and restarted.process.alive():  # run alone: kill it here
        restarted.kill()
    client = replicas.client()
    stop = threading.Event()
    outcomes: list[Outcome] = []

    def load(worker: int) -> None:
        index = 0
        while not stop.is_set():
            outcomes.append(one_chat(client, index * 2 + worker, seed_base=50_000))
            index += 1

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(2)]
    for thread in threads:
        thread.start()
    try:
        restarted.start()
        assert restarted.process is not None
        deadline = time.monotonic() + 300
        loading_seen: list[float] = []  # when the replica was seen listening but NOT_SERVING, after a metrics read
        while True:
            assert time.monotonic() < deadline and restarted.process.alive(), restarted.process.log_text()[-3000:]
            try:
                calls = restarted.generate_calls()  # read first: if health still says NOT_SERVING after, this count is the loading window's
            except OSError:
                time.sleep(0.05)  # not listening yet
                continue
            if check(restarted.target, timeout=1.0):
                serving_at = time.monotonic()
                break
            assert calls == 0, f"a loading replica got {calls} Generate calls"
            loading_seen.append(time.monotonic())
            time.sleep(0.05)
        while (calls := restarted.generate_calls()) == 0:
            assert time.monotonic() - serving_at < 30, "the restarted decoder got no call in 30 s"
            time.sleep(0.05)
        rejoin_s = time.monotonic() - serving_at
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    print(
        f"restarted decoder: loading observed for {loading_seen[-1] - loading_seen[0] if loading_seen else 0:.2f}s, first call {rejoin_s:.2f}s after SERVING"
    )
    assert loading_seen, "the replica was never observed loading (NOT_SERVING)"
    served_while_loading = [o for o in outcomes if loading_seen[0] <= o.finished_at <= loading_seen[-1] and not o.error]
    assert served_while_loading, "no request completed while the replica loaded: the window proved nothing"
    assert rejoin_s < REJOIN_LIMIT_S, f"the restarted decoder got its first call {rejoin_s:.1f}s after SERVING"
    assert not [o for o in outcomes if o.error], [o for o in outcomes if o.error]


def test_sigterm_drains_a_decoder_without_a_single_failure(replicas: Replicas) -> None:
    """SIGTERM (graceful): health goes NOT_SERVING, running streams finish, new calls go elsewhere; it exits 0."""
    draining, other = replicas.decoders[1], replicas.decoders[0]
    for replica in (draining, other):
        if replica.process is None or not replica.process.alive():
            replica.start().wait()
    client = replicas.client()
    done = threading.Event()
    completed: list[Outcome] = []

    def run(index: int) -> Outcome:
        outcome = one_chat(client, index, seed_base=90_000)
        completed.append(outcome)
        if len(completed) >= 6:
            done.set()
        return outcome

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(run, i) for i in range(24)]
        assert done.wait(180), "the stack did not answer"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not draining.in_flight():
            time.sleep(0.005)
        assert draining.process is not None and draining.process.proc is not None
        proc, start = draining.process.proc, time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(12)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(10)
            pytest.fail(f"the decoder did not exit 12 s after SIGTERM:\n{draining.process.log_text()[-6000:]}")
        stopped_s = time.monotonic() - start
        draining.process.stop()
        outcomes = [f.result(timeout=300) for f in futures]
    assert not [o for o in outcomes if o.error], [o for o in outcomes if o.error]
    assert code == 0
    assert stopped_s < 10, f"an idle health watch should not hold the shutdown for its grace: {stopped_s:.1f}s"
