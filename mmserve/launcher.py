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


def resolve_command(argv: list[str]) -> list[str]:
    """Find `mmserve` next to the running Python first (a venv need not be on PATH)."""
    exe = Path(sys.executable).parent / argv[0]
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
            resolve_command(self.argv), env=env, stdout=self._log, stderr=subprocess.STDOUT if self._log else None
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
