"""Replicas found and dropped through DNS (issue 13, item 8): what `--scale` does behind one service name.

The gateway reaches the decoders, and the decoders the encoders, through `dns://<server>/<name>:<port>`
targets whose DNS server is a tiny one run here (dnslib, on a free loopback UDP port) answering A
records from a list the test changes. gRPC's resolver honours the server in the target's authority,
never polls and ignores TTLs: it resolves again only when a connection is lost, so the services age
their connections out (`MMSERVE_GRPC_MAX_CONNECTION_AGE_S`, shortened here) and a name's new answer
must be in use within `FIND_BOUND_S` (mmserve/rpc/channel.py says why). Replica 1 of each service
listens on 127.0.0.1, replica 2 on 127.0.0.2, on the same port (loopback is all of 127.0.0.0/8), as
replicas of one service behind one name do. Under a client loop (text, fresh images so an encoder
runs, streams): replica 2, listed only later, then gets calls from the running clients; replica 1,
taken off the name, stops getting them, is stopped, and no request fails.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from mmserve.launcher import ServiceProcess
from mmserve.localredis import LocalRedis, free_port
from tests.conftest import CACHE_DIR, TINY
from tests.test_replicas import Outcome, Replica, one_chat, running

pytestmark = pytest.mark.slow  # service processes found through DNS names

AGE_S = 3.0  # MMSERVE_GRPC_MAX_CONNECTION_AGE_S of every service here (30 s by default)
# A new answer is used after the next connection ages out (gRPC jitters the age by +-10%), one resolution
# (at most one a second) and a connection with its health check; the rest is slack for 2 shared cores.
FIND_BOUND_S = 1.1 * AGE_S + 1.0 + 8.0
HOSTS = ("127.0.0.1", "127.0.0.2")


class Answers(BaseResolver):  # type: ignore[misc]
    """A records from `records` (name -> addresses, changed by the test); NXDOMAIN for other names."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.queries: list[tuple[float, str]] = []  # (when, name) of each A query

    def publish(self, name: str, *addresses: str) -> None:
        with self.lock:
            self.records[name] = list(addresses)

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        with self.lock:
            addresses = self.records.get(name)
            if request.q.qtype == QTYPE.A:
                self.queries.append((time.monotonic(), name))
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:  # AAAA and the rest: an empty answer
            for address in addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply


def port_free_on_both() -> int:
    """A TCP port free on 127.0.0.1 and 127.0.0.2 a moment ago."""
    while True:
        with socket.socket() as first:
            first.bind((HOSTS[0], 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind((HOSTS[1], port))
                except OSError:
                    continue
                return port


@dataclass
class Stack:
    answers: Answers
    encoders: list[Replica]  # [on 127.0.0.1, on 127.0.0.2]
    decoders: list[Replica]
    base_url: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stack(module_redis: LocalRedis, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("dns-replicas")
    answers = Answers()
    answers.publish("encoders.test", HOSTS[0])
    answers.publish("decoders.test", HOSTS[0])
    dns = DNSServer(answers, port=0, address="127.0.0.1", logger=DNSLogger(logf=lambda _line: None))
    dns.start_thread()
    dns_port = dns.server.server_address[1]
    encoder_port, decoder_port = port_free_on_both(), port_free_on_both()
    env = {
        "MMSERVE_MODEL": f"tiny:{TINY}", "MMSERVE_CACHE_DIR": str(CACHE_DIR), "MMSERVE_REDIS_URL": module_redis.url,
        "MMSERVE_SHUTDOWN_GRACE_S": "2", "MMSERVE_GRPC_MAX_CONNECTION_AGE_S": str(AGE_S),
        "MMSERVE_ENCODER_TARGET": f"dns://127.0.0.1:{dns_port}/encoders.test:{encoder_port}",
        "MMSERVE_FETCH_ALLOW_LOOPBACK": "true", "MMSERVE_MAX_RUNNING_REQUESTS": "4", "MMSERVE_LOG_LEVEL": "INFO",
        "PYTHONFAULTHANDLER": "1",
    }  # fmt: skip
    encoders = [Replica("encoder", encoder_port, env, logs, host=host) for host in HOSTS]
    decoders = [Replica("decoder", decoder_port, env, logs, host=host) for host in HOSTS]
    gateway_port = free_port()
    gateway = ServiceProcess("gateway", {
        **env, "MMSERVE_HOST": "127.0.0.1", "MMSERVE_GATEWAY_PORT": str(gateway_port),
        "MMSERVE_DECODER_TARGET": f"dns://127.0.0.1:{dns_port}/decoders.test:{decoder_port}",
    }, log_path=logs / "gateway.log")  # fmt: skip
    try:
        # Replica 2 of each loads with the rest (the loads overlap) but is not on the name yet.
        with running(encoders, decoders, gateway, gateway_port):
            yield Stack(answers, encoders, decoders, f"http://127.0.0.1:{gateway_port}/v1")
    finally:
        dns.stop()


@dataclass
class Load:
    """Two client threads sending chats (every other one with a new image) until stopped."""

    client: openai.OpenAI
    seed_base: int
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        def loop(worker: int) -> None:
            index = 0
            while not self.stop.is_set():
                self.outcomes.append(one_chat(self.client, index * 2 + worker, seed_base=self.seed_base))
                index += 1

        self.threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in range(2)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error]


def wait_for_calls(replica: Replica, rpc: str, *, since: float, bound_s: float) -> float:
    """Seconds from `since` until `replica` has answered an `rpc` call; fails after `bound_s`."""
    while replica.calls(rpc) == 0:
        waited = time.monotonic() - since
        assert waited < bound_s, f"{replica.target} got no {rpc} call {waited:.1f}s after it was put on the name"
        time.sleep(0.1)
    return time.monotonic() - since


def assert_no_calls_while_unlisted(stack: Stack, load: Load, replica: Replica, rpc: str) -> None:
    """Past a few connection ages (so the clients re-resolved), a replica not on the name has had no call."""
    before = len(load.outcomes)
    time.sleep(1.1 * AGE_S + 1.5)
    assert len(load.outcomes) > before, "no request completed: the wait proved nothing"
    assert replica.calls(rpc) == 0, f"{replica.target} got {rpc} calls before it was on the name"


def test_an_encoder_put_on_the_name_gets_calls_from_a_running_decoder(stack: Stack) -> None:
    """decoder -> encoder: the decoder on 127.0.0.1 (the only one the gateway knows) finds the new encoder."""
    new = stack.encoders[1]
    with Load(stack.client(), seed_base=200_000) as load:
        assert_no_calls_while_unlisted(stack, load, new, "Encode")
        put_at = time.monotonic()
        stack.answers.publish("encoders.test", *HOSTS)
        found_s = wait_for_calls(new, "Encode", since=put_at, bound_s=FIND_BOUND_S)
    print(f"the new encoder got its first call {found_s:.2f}s after it was put on the name (age {AGE_S}s)")
    assert stack.decoders[1].calls("Generate") == 0, "only the decoder on the name may have called it"
    assert not load.failures(), load.failures()


def test_a_decoder_put_on_the_name_gets_calls_from_the_running_gateway(stack: Stack) -> None:
    """gateway -> decoder: the running gateway finds the new decoder."""
    new = stack.decoders[1]
    with Load(stack.client(), seed_base=300_000) as load:
        assert_no_calls_while_unlisted(stack, load, new, "Generate")
        put_at = time.monotonic()
        stack.answers.publish("decoders.test", *HOSTS)
        found_s = wait_for_calls(new, "Generate", since=put_at, bound_s=FIND_BOUND_S)
    print(f"the new decoder got its first call {found_s:.2f}s after it was put on the name (age {AGE_S}s)")
    assert not load.failures(), load.failures()


def test_replicas_taken_off_the_name_stop_getting_calls_and_stop_without_a_failure(stack: Stack) -> None:
    """Off the name, replica 1 of each service gets no new call within the bound; SIGTERMed then, no request fails."""
    for name in ("encoders.test", "decoders.test"):
        stack.answers.publish(name, *HOSTS)  # as the tests above leave it (this one may run alone)
    leaving = [(stack.encoders[0], "Encode"), (stack.decoders[0], "Generate")]
    staying = [(stack.encoders[1], "Encode"), (stack.decoders[1], "Generate")]
    quiet_s = 3.0  # no call to a removed replica for this long, while the others serve, means it is off the list
    with Load(stack.client(), seed_base=400_000) as load:
        wait_for_calls(stack.decoders[1], "Generate", since=time.monotonic(), bound_s=FIND_BOUND_S)
        removed_at = time.monotonic()
        for name in ("encoders.test", "decoders.test"):
            stack.answers.publish(name, HOSTS[1])
        deadline = removed_at + FIND_BOUND_S + quiet_s
        while True:
            window_start = time.monotonic()
            before = [replica.calls(rpc) for replica, rpc in leaving + staying]
            time.sleep(quiet_s)
            after = [replica.calls(rpc) for replica, rpc in leaving + staying]
            if after[:2] == before[:2] and all(a > b for a, b in zip(after[2:], before[2:], strict=True)):
                break  # the leaving ones had no call for quiet_s while the staying ones had some
            assert time.monotonic() < deadline, (
                f"calls before/after {quiet_s}s (leaving encoder, decoder; staying encoder, decoder): {before} {after}"
            )
        dropped_s = window_start - removed_at
        for replica, _rpc in leaving:
            assert replica.process is not None
            assert replica.process.stop() == 0, replica.process.log_text()[-3000:]  # SIGTERM: graceful
        stopped_at, done_before = time.monotonic(), len(load.outcomes)
        while len(load.outcomes) < done_before + 6:
            assert time.monotonic() - stopped_at < 60, "the stack stopped answering after replica 1 stopped"
            time.sleep(0.1)
    print(f"replica 1 of each service got its last call at most {dropped_s:.2f}s after it was taken off the name")
    assert not load.failures(), load.failures()
