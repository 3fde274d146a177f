"""What tiny checkpoints exist: one `CheckpointSpec` per name, one builder module per family.

Kept free of torch/transformers imports so listing checkpoints (the CLI's
`--help`, config validation) stays instant; the family module that knows how to
build a spec is imported only when a build is needed.

Adding a family is: a module here with `build(spec, out_dir)` (ending with
`time_series.attach_time_series_adapter`, so every checkpoint carries the
time-series adapter in `time_series/`), one line in `FAMILY_MODULES`, its chat
template under `templates/<family>.jinja`, and its entries in `CHECKPOINTS`. A
special token it needs takes the next reserved slot of `tokenizer.SPECIAL_TOKENS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol


@dataclass(frozen=True)
class TowerSize:
    """Shape of one transformer stack (the LLM or a modality encoder)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    kv_heads: int | None = None  # grouped-query attention; None means `heads`

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class CheckpointSpec:
    """Everything that decides a tiny checkpoint's bytes, apart from the generator code itself."""

    name: str
    family: str
    text: TowerSize
    vision: TowerSize | None = None
    audio: TowerSize | None = None
    time_series: TowerSize | None = None
    # Large enough that random weights give varied greedy output (0.02 repeats one token).
    initializer_range: float = 0.3
    seed: int = 0
    description: str = ""


class FamilyBuilder(Protocol):
    """What a family module provides."""

    def build(self, spec: CheckpointSpec, out_dir: Path) -> None:
        """Write model, config, generation config, tokenizer and processor into `out_dir`."""


# family -> module with `build(spec, out_dir)`
FAMILY_MODULES: Mapping[str, str] = MappingProxyType(
    {
        "qwen2_5_vl": "mmserve.models.tiny.qwen2_5_vl",
        "qwen3_vl": "mmserve.models.tiny.qwen3_vl",
        "qwen2_5_omni": "mmserve.models.tiny.qwen2_5_omni",
    }
)


def family_builder(family: str) -> FamilyBuilder:
    """Import the module that builds checkpoints of `family`."""
    try:
        module_name = FAMILY_MODULES[family]
    except KeyError:
        raise ValueError(f"no tiny-checkpoint builder for family {family!r}") from None
    return importlib.import_module(module_name)  # type: ignore[return-value]


_SPECS = (
    CheckpointSpec(
        name="qwen2_5_vl-tiny",
        family="qwen2_5_vl",
        text=TowerSize(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256),
        vision=TowerSize(hidden=64, layers=2, heads=4, intermediate=128),
        description="~1 M params; builds in seconds; for tests and the offline demo.",
    ),
    CheckpointSpec(
        name="qwen2_5_vl-mid",
        family="qwen2_5_vl",
        text=TowerSize(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2560),
        vision=TowerSize(hidden=512, layers=8, heads=8, intermediate=1376),
        time_series=TowerSize(hidden=256, layers=4, heads=4, intermediate=1024),
        description="~120 M params; realistic CPU timings for benchmarks.",
    ),
    CheckpointSpec(
        name="qwen3_vl-tiny",
        family="qwen3_vl",
        text=TowerSize(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256),
        vision=TowerSize(hidden=64, layers=3, heads=4, intermediate=128),  # DeepStack taps blocks 0 and 1
        description="~1 M params; builds in seconds; for tests and the offline demo.",
    ),
    CheckpointSpec(
        name="qwen3_vl-mid",
        family="qwen3_vl",
        text=TowerSize(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2560),
        # Narrower than qwen2_5_vl-mid's tower: each of the 3 DeepStack mergers is (4*hidden)^2 wide.
        vision=TowerSize(hidden=384, layers=8, heads=6, intermediate=1536),
        time_series=TowerSize(hidden=256, layers=4, heads=4, intermediate=1024),
        description="~120 M params; realistic CPU timings for benchmarks.",
    ),
    CheckpointSpec(
        name="qwen2_5_omni-tiny",
        family="qwen2_5_omni",
        text=TowerSize(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256),
        vision=TowerSize(hidden=64, layers=2, heads=4, intermediate=128),
        audio=TowerSize(hidden=64, layers=2, heads=4, intermediate=128),
        description="Qwen2.5-Omni thinker, ~1 M params; builds in seconds; for tests and the offline demo.",
    ),
    CheckpointSpec(
        name="qwen2_5_omni-mid",
        family="qwen2_5_omni",
        text=TowerSize(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2560),
        vision=TowerSize(hidden=512, layers=8, heads=8, intermediate=1376),
        audio=TowerSize(hidden=384, layers=4, heads=6, intermediate=1536),
        time_series=TowerSize(hidden=256, layers=4, heads=4, intermediate=1024),
        description="Qwen2.5-Omni thinker, ~130 M params; realistic CPU timings for benchmarks.",
    ),
)

CHECKPOINTS: Mapping[str, CheckpointSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def get_spec(name: str) -> CheckpointSpec:
    """The spec called `name`, or a ValueError listing the known names."""
    try:
        return CHECKPOINTS[name]
    except KeyError:
        known = ", ".join(CHECKPOINTS)
        raise ValueError(f"unknown tiny checkpoint {name!r}; known: {known}") from None
