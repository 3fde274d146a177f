"""What tiny checkpoints exist: one `CheckpointSpec` per name, one builder module per family.

Kept free of torch/transformers imports so listing checkpoints (the CLI's
`--help`, config validation) stays instant; the family module that knows how to
build a spec is imported only when a build is needed.

Adding a family is: a builder module in the family's folder with
`build(spec, out_dir)` (built from the shared pieces in `common`, ending with
`common.save_checkpoint`, which also writes the time-series adapter every
checkpoint carries in `time_series/`), its chat template in that folder's
`templates/<family>.jinja`, one line in `FAMILY_MODULES`, and its
`TINY.spec(...)` / `MID.spec(...)` entries in `_SPECS`. A special token
it needs takes the next reserved slot of `tokenizer.SPECIAL_TOKENS`.
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
        "qwen2_5_vl": "mmserve.models.families.qwen.tiny_qwen2_5_vl",
        "qwen3_vl": "mmserve.models.families.qwen.tiny_qwen3_vl",
        "qwen2_5_omni": "mmserve.models.families.qwen.tiny_qwen2_5_omni",
        "gemma3": "mmserve.models.families.gemma3.tiny_gemma3",
        "voxtral": "mmserve.models.families.voxtral.tiny_voxtral",
    }
)


def family_builder(family: str) -> FamilyBuilder:
    """Import the module that builds checkpoints of `family`."""
    try:
        module_name = FAMILY_MODULES[family]
    except KeyError:
        raise ValueError(f"no tiny-checkpoint builder for family {family!r}") from None
    return importlib.import_module(module_name)


@dataclass(frozen=True)
class Tier:
    """What a size tier fixes for every family: the LLM, the time-series adapter, the checkpoints' purpose."""

    suffix: str  # the checkpoint is called `<family>-<suffix>`
    text: TowerSize
    time_series: TowerSize | None  # None: the adapter's default size (`time_series.DEFAULT_SIZE`)
    purpose: str

    def spec(
        self, family: str, params: str, *, vision: TowerSize | None = None, audio: TowerSize | None = None, what: str = ""
    ) -> CheckpointSpec:
        """This tier's checkpoint of `family`, with the family's encoder sizes; `params` e.g. "~120 M"."""
        return CheckpointSpec(
            name=f"{family}-{self.suffix}",
            family=family,
            text=self.text,
            vision=vision,
            audio=audio,
            time_series=self.time_series,
            description=f"{what}{params} params; {self.purpose}",
        )


TINY = Tier(
    suffix="tiny",
    text=TowerSize(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256),
    time_series=None,
    purpose="builds in seconds; for tests and the offline demo.",
)
MID = Tier(
    suffix="mid",
    text=TowerSize(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2560),
    time_series=TowerSize(hidden=256, layers=4, heads=4, intermediate=1024),
    purpose="realistic CPU timings for benchmarks.",
)
TINY_ENCODER = TowerSize(hidden=64, layers=2, heads=4, intermediate=128)
OMNI_THINKER = "Qwen2.5-Omni thinker, "
VOXTRAL = "Voxtral (audio + text, Tekken tokenizer), "

_SPECS = (
    TINY.spec("qwen2_5_vl", "~1 M", vision=TINY_ENCODER),
    MID.spec("qwen2_5_vl", "~120 M", vision=TowerSize(hidden=512, layers=8, heads=8, intermediate=1376)),
    TINY.spec("qwen3_vl", "~1 M", vision=TowerSize(hidden=64, layers=3, heads=4, intermediate=128)),  # DeepStack taps blocks 0 and 1
    # Narrower than qwen2_5_vl-mid's tower: each of the 3 DeepStack mergers is (4*hidden)^2 wide.
    MID.spec("qwen3_vl", "~120 M", vision=TowerSize(hidden=384, layers=8, heads=6, intermediate=1536)),
    TINY.spec("qwen2_5_omni", "~1 M", vision=TINY_ENCODER, audio=TINY_ENCODER, what=OMNI_THINKER),
    MID.spec(
        "qwen2_5_omni",
        "~130 M",
        vision=TowerSize(hidden=512, layers=8, heads=8, intermediate=1376),
        audio=TowerSize(hidden=384, layers=4, heads=6, intermediate=1536),
        what=OMNI_THINKER,
    ),
    # SigLIP towers (the size of Gemma 3's is fixed by the image side, not the LLM).
    TINY.spec("gemma3", "~1 M", vision=TINY_ENCODER, what="Gemma 3 (image + text), "),
    MID.spec("gemma3", "~110 M", vision=TowerSize(hidden=512, layers=8, heads=8, intermediate=1376), what="Gemma 3 (image + text), "),
    # Voxtral's projector stacks 4 encoder frames: the audio tower's intermediate size is 4 x its width.
    TINY.spec("voxtral", "~1.3 M", audio=TowerSize(hidden=64, layers=2, heads=4, intermediate=256), what=VOXTRAL),
    MID.spec("voxtral", "~100 M", audio=TowerSize(hidden=384, layers=4, heads=6, intermediate=1536), what=VOXTRAL),
)

CHECKPOINTS: Mapping[str, CheckpointSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def get_spec(name: str) -> CheckpointSpec:
    """The spec called `name`, or a ValueError listing the known names."""
    try:
        return CHECKPOINTS[name]
    except KeyError:
        known = ", ".join(CHECKPOINTS)
        raise ValueError(f"unknown tiny checkpoint {name!r}; known: {known}") from None
