"""The public gRPC contract: lint-clean, commented, and the committed stubs are what protos/generate.py makes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_buf_lint_passes() -> None:
    """STANDARD + COMMENTS rules: package/dir layout, names, enum zero values, a comment on every element."""
    result = subprocess.run([_tool("buf"), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], check=True, capture_output=True, timeout=120
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protos/generate.py produced nothing"
    stale = [str(rel) for rel in generated if (ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"regenerate with `python protos/generate.py`: {stale}"
    committed = {p.relative_to(ROOT) for p in (ROOT / "mmserve" / "api").rglob("*_pb2*")}
    assert committed == {rel for rel in generated if "_pb2" in rel.name}, "stubs without a .proto (or the reverse)"


def test_every_service_follows_the_naming_conventions() -> None:
    from mmserve.api.decoder.v1 import decoder_service_pb2
    from mmserve.api.encoder.v1 import encoder_service_pb2

    for module in (encoder_service_pb2, decoder_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            assert service.full_name.startswith("mmserve.") and service.name.endswith("Service")
            for method in service.methods:
                assert method.input_type.name == f"{method.name}Request"
                assert method.output_type.name == f"{method.name}Response"
