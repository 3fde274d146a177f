"""The plugin point for model families: the `mmserve.families` entry-point group.

Each entry names one `Family` class (`name = "package.module:Class"`); the
class says which checkpoint `config.model_type` values it serves
(`Family.model_types`). mmserve's own families are entries of this package's
pyproject.toml; a family shipped in another package registers the same way,
in its own pyproject, and is picked up once installed: nothing here lists them.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points

from mmserve.models.families.base import Family

log = logging.getLogger("mmserve.models")

#: The entry-point group families register under.
GROUP = "mmserve.families"


@functools.cache
def families() -> dict[str, type[Family]]:
    """Every registered family by the model_type values it serves (loaded once per process)."""
    by_type: dict[str, type[Family]] = {}
    for entry in entry_points(group=GROUP):
        cls = entry.load()
        if not (isinstance(cls, type) and issubclass(cls, Family)):
            raise TypeError(f"entry point {entry.name} = {entry.value} in {GROUP} is not a Family class")
        for model_type in cls.model_types or (cls.name,):
            other = by_type.setdefault(model_type, cls)
            if other is not cls:
                log.warning("model_type %s is served by both %s and %s: using %s", model_type, other.__name__, cls.__name__, other.__name__)
    if not by_type:
        raise RuntimeError(f"no model family is registered under {GROUP}: is mmserve installed (pip install -e .)?")
    return by_type


def family_for(model_type: str) -> type[Family] | None:
    """The family serving checkpoints of `model_type`, or None."""
    return families().get(model_type)
