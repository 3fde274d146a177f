"""Tiny random-weight checkpoints of the supported architectures, generated offline and cached.

They are saved with `save_pretrained` and load with `from_pretrained` exactly
like hub checkpoints, so tests and the offline demo exercise the real model
and processor code without network access. Importing this package is cheap;
torch and transformers load only when a checkpoint is built.
"""

from mmserve.models.tiny.cache import (
    MARKER,
    checkpoint_dir,
    default_cache_dir,
    ensure_checkpoint,
    generator_digest,
    read_marker,
)
from mmserve.models.tiny.cli import main
from mmserve.models.tiny.registry import CHECKPOINTS, CheckpointSpec, TowerSize

__all__ = [
    "CHECKPOINTS",
    "MARKER",
    "CheckpointSpec",
    "TowerSize",
    "checkpoint_dir",
    "default_cache_dir",
    "ensure_checkpoint",
    "generator_digest",
    "main",
    "read_marker",
]
