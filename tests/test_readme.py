"""The README stays true: its configuration table is the settings' own, and its commands are the CI's."""

from __future__ import annotations

import re
from pathlib import Path

from mmserve.config import Settings, markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_configuration_table_is_generated_from_the_settings() -> None:
    section = README.split("<!-- config-table:start -->\n", 1)[1].split("<!-- config-table:end -->", 1)[0]
    assert section == markdown_table(), "regenerate with `python -m mmserve.config`"
    for name in Settings.model_fields:
        assert f"`MMSERVE_{name.upper()}`" in section


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test_command, "the last line of .ci/run must be the README's test command"
    assert any("mmserve up" in b for b in blocks)
