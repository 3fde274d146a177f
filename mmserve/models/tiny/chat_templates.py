"""Chat templates of the tiny checkpoints, one Jinja file per family under `templates/`."""

from __future__ import annotations

from importlib.resources import files


def load_chat_template(family: str) -> str:
    """The Jinja chat template for `family` (as the real checkpoints of that family ship it)."""
    return files(__package__).joinpath("templates", f"{family}.jinja").read_text(encoding="utf-8")
