"""Start and stop mmserve service processes: used by `mmserve up` and by the tests.

The command each role runs is defined once, in `SERVICE_COMMANDS`; compose
runs the same commands in its containers (a test checks that), so what the
integration tests start is what users deploy.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

#: The command of every role, as compose and `mmserve up` run it.
SERVICE_COMMANDS: dict[str, list[str]] = {
    "encoder": ["mmserve", "encoder"],
    "decoder": ["mmserve", "decoder"],
    "gateway": ["mmserve", "gateway"],
}


def resolve_command(argv: list[str], venv: Path | None = None) -> list[str]:
    """Find `mmserve` in `venv` (the vLLM decoder's own environment), else next to the running Python (a venv need not be on PATH)."""
    exe = (venv / "bin" if venv is not None else Path(sys.executable).parent) / argv[0]
    if venv is not None and not exe.exists():
        raise FileNotFoundError(f"{exe} is missing: build that environment first (scripts/build-vllm-env {venv})")
    found = str(exe) if exe.exists() else shutil.which(argv[0])
    if found is None:
        raise FileNotFoundError(f"{argv[0]} is not installed (pip install -e .)")
    return [found, *argv[1:]]


@dataclass
class ServiceProcess:
    """One role running as a child process with its own environment and log file."""

    role: str
    env: dict[str, str]
    log_path: Path | None = None
    venv: Path | None = None  # run from this environment instead of the current one
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def argv(self) -> list[str]:
        return SERVICE_COMMANDS[self.role]

    def start(self) -> ServiceProcess:
        env = {**os.environ, **self.env}
        if self.log_path is not None:
            self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            resolve_command(self.argv, self.venv), env=env, stdout=self._log, stderr=subprocess.STDOUT if self._log else None
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL after `timeout` seconds."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


class LocalStack:
    """Redis + encoder + decoder + gateway for one model on free loopback ports (the benchmarks' stack).

    The same commands as `mmserve up`, each service logging to its own file;
    on a failed start the logs' tails go to stderr.
    """

    def __init__(self, model: str, cache_dir: Path, extra_env: dict[str, str] | None = None, log_level: str = "WARNING") -> None:
        import tempfile

        from mmserve.localredis import LocalRedis, free_port
        from mmserve.rpc.health import wait_serving
        from mmserve.stack import wait_http_ok

        self.redis = LocalRedis(maxmemory="2gb").start()
        ports = {role: free_port() for role in ("encoder", "decoder", "gateway")}
        env = {
            "MMSERVE_MODEL": model, "MMSERVE_CACHE_DIR": str(cache_dir), "MMSERVE_REDIS_URL": self.redis.url,
            "MMSERVE_HOST": "127.0.0.1", "MMSERVE_ENCODER_PORT": str(ports["encoder"]), "MMSERVE_DECODER_PORT": str(ports["decoder"]),
            "MMSERVE_GATEWAY_PORT": str(ports["gateway"]), "MMSERVE_ENCODER_TARGET": f"127.0.0.1:{ports['encoder']}",
            "MMSERVE_DECODER_TARGET": f"127.0.0.1:{ports['decoder']}", "MMSERVE_LOG_LEVEL": log_level, **(extra_env or {}),
        }
        self.logs = Path(tempfile.mkdtemp(prefix="mmserve-stack-"))
        self.services: list[ServiceProcess] = []
        try:
            for role in ("encoder", "decoder"):
                self.services.append(ServiceProcess(role, env, log_path=self.logs / f"{role}.log").start())
            for service, role in zip(self.services, ("encoder", "decoder"), strict=True):
                wait_serving(f"127.0.0.1:{ports[role]}", timeout=900, alive=service.alive)
            self.services.append(ServiceProcess("gateway", env, log_path=self.logs / "gateway.log").start())
            wait_http_ok(f"http://127.0.0.1:{ports['gateway']}/health", timeout=60, alive=self.services[-1].alive)
        except BaseException:
            for service in self.services:
                print(f"{service.role} log ({service.log_path}):\n{service.log_text()[-3000:]}", file=sys.stderr)
            self.close()
            raise
        self.base_url = f"http://127.0.0.1:{ports['gateway']}/v1"
        self.encoder_target = f"127.0.0.1:{ports['encoder']}"

    def close(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.redis.stop()
