"""Spawn a private `redis-server` process: for `mmserve up` without a Redis URL, and for tests.

Tests must not touch a shared Redis, and `mmserve up` must work on a machine
where none runs; both start their own server on a free loopback port with an
LRU memory cap, the same policy compose uses. With a `data_dir` the server
keeps an append-only file there (`AOF_ARGS`, also compose's), so precomputed
embeddings survive a restart; without one (the tests' default) it is memory
only. A data dir is locked while its server runs: two servers appending to
one file would destroy it. `LocalRedisCluster` is the same for Redis Cluster:
three (or more) cluster-enabled servers joined with `redis-cli --cluster
create`, for the tests and the cluster benchmark.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Persistence of a server with a data dir, and of compose's Redis (tests/test_compose.py checks):
#: every write appended to a file, fsynced once a second (a crash loses at most ~1 s, a SIGTERM nothing).
AOF_ARGS = ("--appendonly", "yes", "--appendfsync", "everysec")
LOCK_NAME = "mmserve-redis.lock"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalRedis:
    """A redis-server child process bound to loopback; restartable on the same port (and data dir)."""

    port: int = field(default_factory=free_port)
    maxmemory: str = "1gb"
    policy: str = "allkeys-lru"
    data_dir: Path | None = None  # persistent (AOF) in this folder; memory only when None
    extra_args: tuple[str, ...] = ()  # more redis-server flags (e.g. cluster mode)
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mmserve-redis-")))
    _lock_fd: int | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, exe: str) -> list[str]:
        """The redis-server command line: persistence by `data_dir`, the memory cap, loopback only."""
        persistence = [*AOF_ARGS, "--dir", str(self.data_dir)] if self.data_dir else ["--appendonly", "no", "--dir", str(self.workdir)]
        return [
            exe,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            *persistence,
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", self.policy,
            *self.extra_args,
        ]  # fmt: skip

    def _lock(self) -> int | None:
        """Hold the data dir's lock (shared with the child, so it lasts while either lives)."""
        if self.data_dir is None:
            return None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"another redis-server keeps its data in {self.data_dir}: stop it, or give this one another "
                "folder (MMSERVE_REDIS_DATA_DIR) or none (MMSERVE_REDIS_PERSIST=false)"
            ) from None
        return fd

    def start(self, timeout: float = 10.0) -> LocalRedis:
        """Start and wait until it answers PING (after loading its append-only file, if any)."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH (Debian/Ubuntu: apt-get install redis-server)")
        self._lock_fd = self._lock()
        fds = () if self._lock_fd is None else (self._lock_fd,)
        self.proc = subprocess.Popen(self.command(exe), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=fds)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"redis-server exited with {code} on port {self.port}")
            if self._ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")  # -LOADING while it reads its file
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a persistent server flushes its file first), SIGKILL after `timeout` s; then unlock."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LocalRedisCluster:
    """A Redis Cluster of `masters` loopback redis-server children (no replicas), all slots assigned."""

    masters: int = 3
    maxmemory: str = "1gb"
    nodes: list[LocalRedis] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The mmserve URL of the cluster: every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> LocalRedisCluster:
        """Start the nodes, assign the slots, and wait until every node reports cluster_state:ok."""
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH (Debian/Ubuntu: apt-get install redis-tools)")
        try:
            for _ in range(self.masters):
                node = LocalRedis(maxmemory=self.maxmemory)
                node.extra_args = (
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node.workdir / "nodes.conf"),
                    "--cluster-port", str(free_port()),  # the bus port: port+10000 may be taken or out of range
                    "--cluster-node-timeout", "2000",
                )  # fmt: skip
                self.nodes.append(node.start())
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout,
            )  # fmt: skip
            self._wait_ok(cli, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, cli: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.nodes)
        while pending and time.monotonic() < deadline:
            info = subprocess.run([cli, "-p", str(pending[0].port), "cluster", "info"], capture_output=True, text=True, timeout=5).stdout
            if "cluster_state:ok" in info:
                pending.pop(0)
            else:
                time.sleep(0.1)
        if pending:
            raise RuntimeError(f"redis cluster on ports {[n.port for n in self.nodes]} not ok within {timeout}s")

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()
        self.nodes.clear()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
