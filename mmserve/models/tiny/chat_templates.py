"""Chat templates of the tiny checkpoints: `templates/<family>.jinja` in the family's folder, next to its builder."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

from mmserve.models.tiny.registry import FAMILY_MODULES


def template_file(family: str) -> Traversable:
    """Where `family`'s template lives: the `templates/` folder of the package holding its builder module."""
    package = FAMILY_MODULES[family].rpartition(".")[0]
    return files(package).joinpath("templates", f"{family}.jinja")


def load_chat_template(family: str) -> str:
    """The Jinja chat template for `family` (as the real checkpoints of that family ship it)."""
    return template_file(family).read_text(encoding="utf-8")
