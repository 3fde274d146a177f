"""The `mmserve` command: every subcommand is an installed entry point, listed by --help without importing a role."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from mmserve.cli import GROUP, commands

ROOT = Path(__file__).resolve().parents[1]
DECLARED = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]


def test_the_installed_commands_are_the_declared_ones() -> None:
    assert {name: ep.value for name, ep in commands().items()} == DECLARED, "reinstall: pip install -e ."


def test_help_lists_every_command_without_importing_a_role() -> None:
    code = (
        "import sys\n"
        "from mmserve.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as stop:\n    assert stop.code == 0, stop.code\n"
        "print('loaded:', ','.join(m for m in ('services', 'gateway', 'torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("loaded:"), result.stdout
    for name in DECLARED:
        assert f"    {name} " in result.stdout, f"{name} missing from mmserve --help"
    assert "(not installed)" not in result.stdout


def test_every_command_loads_and_parses_its_own_help() -> None:
    for name, ep in commands().items():
        assert callable(ep.load()), name
    result = subprocess.run([str(Path(sys.executable).parent / "mmserve"), "token", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: mmserve token" in result.stdout, result.stdout + result.stderr


def test_an_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "mmserve", "nope"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice: 'nope'" in result.stderr, result.stderr


def _openmp_waits_after(cases: dict[tuple[str, tuple[tuple[str, str], ...]], str]) -> list[str]:
    """OMP_WAIT_POLICY/GOMP_SPINCOUNT as each process has them once `mmserve <command> --help` ran (the role's module loaded).

    One process per (command, extra environment), all started at once: each imports its role's modules (torch).
    """
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MMSERVE_DECODER_ENGINE")}
    procs = []
    for command, env in cases:
        code = (
            "import os\nfrom mmserve.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "print('wait:', os.environ.get('OMP_WAIT_POLICY', '-') + '/' + os.environ.get('GOMP_SPINCOUNT', '-'))\n"
        )
        run = [sys.executable, "-c", code]
        procs.append(subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**base, **dict(env)}))
    waits = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        waits.append(out.rstrip().rsplit("wait: ", 1)[-1])
    return waits


def test_model_roles_spin_briefly_then_sleep_unless_told_otherwise() -> None:
    """Set before torch loads libgomp: idle OpenMP threads of the encoder and decoder spin ~30 µs, then sleep."""
    cases = {
        ("encoder", ()): "PASSIVE/3000",
        ("decoder", ()): "PASSIVE/3000",
        ("decoder", (("MMSERVE_DECODER_ENGINE", "vllm"),)): "-/-",  # vLLM keeps its own
        ("encoder", (("OMP_WAIT_POLICY", "ACTIVE"),)): "ACTIVE/-",  # the environment wins...
        ("encoder", (("GOMP_SPINCOUNT", "0"),)): "-/0",  # ...either variable of it
        ("gateway", ()): "-/-",  # no torch there
    }
    assert _openmp_waits_after(cases) == list(cases.values())
