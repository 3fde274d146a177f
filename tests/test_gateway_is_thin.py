"""The gateway stays thin: importing and building it loads no torch, transformers or media decoders."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "PIL", "av", "soundfile", "numpy", "redis")


def test_gateway_imports_nothing_heavy() -> None:
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
