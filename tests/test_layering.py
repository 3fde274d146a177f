"""The layout shows the architecture: the import contracts in pyproject.toml hold, and the gateway stays thin at run time.

The contracts ([tool.importlinter]): the gateway never imports torch, transformers or service code; the
encoder, the decoder and the gateway never import each other; shared code (`mmserve`) never imports a role.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What a running gateway must not load either, though no contract names it: media decoders, arrays, the store client.
HEAVY = ("torch", "transformers", "PIL", "av", "soundfile", "numpy", "redis")


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout, result.stdout


def test_gateway_imports_nothing_heavy() -> None:
    """Importing and building the app (and its command) loads no torch, transformers, media decoders or Redis client."""
    code = (
        "import sys\n"
        "from gateway.app import create_app\n"
        "from mmserve.config import Settings\n"
        "create_app(Settings())\n"
        "import gateway.main, mmserve.cli\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the gateway imported: {result.stdout.strip()}"
