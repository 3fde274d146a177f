"""Families come through one plugin point, the `mmserve.families` entry-point group: ours and anybody's."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmserve.models.families import Family, families, family_for
from mmserve.models.families.gemma3.gemma3 import Gemma3
from mmserve.models.families.qwen.qwen2_5_omni import Qwen2_5_Omni
from mmserve.models.families.qwen.qwen2_5_vl import Qwen2_5_VL
from mmserve.models.families.qwen.qwen3_vl import Qwen3_VL
from mmserve.models.families.voxtral.voxtral import Voxtral


def test_the_built_in_families_are_registered_by_model_type() -> None:
    found = families()
    assert found["qwen2_5_vl"] is Qwen2_5_VL
    assert found["qwen3_vl"] is Qwen3_VL
    assert found["qwen2_5_omni"] is Qwen2_5_Omni
    assert found["qwen2_5_omni_thinker"] is Qwen2_5_Omni  # a thinker-only checkpoint
    assert found["gemma3"] is Gemma3
    assert found["voxtral"] is Voxtral
    assert family_for("llama") is None


@pytest.fixture
def plugin_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A separately 'installed' distribution (a dist-info folder on the path) that registers its own family."""
    (tmp_path / "acme_family.py").write_text(
        textwrap.dedent("""
        from mmserve.models.families.qwen.qwen2_5_vl import Qwen2_5_VL

        class AcmeVL(Qwen2_5_VL):
            name = "acme_vl"
            model_types = ("acme_vl", "acme_vl_v2")
    """)
    )
    info = tmp_path / "acme_family-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-family\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mmserve.families]\nacme_vl = acme_family:AcmeVL\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    families.cache_clear()
    yield tmp_path
    families.cache_clear()


def test_a_family_from_another_package_is_found_once_installed(plugin_package: Path) -> None:
    acme = family_for("acme_vl_v2")
    assert acme is not None and issubclass(acme, Family) and acme.__name__ == "AcmeVL"
    assert family_for("acme_vl") is acme
    assert families()["qwen3_vl"] is Qwen3_VL  # ours are still there
