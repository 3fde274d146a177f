"""Load the configured model for a service: source -> family -> weights -> fingerprint."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch

from mmserve.api.common.v1 import tensor_pb2
from mmserve.config import Settings
from mmserve.errors import FailedPrecondition
from mmserve.models.families import Family, families, family_for
from mmserve.models.fingerprint import model_fingerprint
from mmserve.models.patch_embed import patch_convs_as_linear
from mmserve.models.source import ModelSource, resolve_model
from mmserve.models.tensors import TORCH_TO_PROTO, dtype_name

log = logging.getLogger("mmserve.models")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A family instance plus what identifies the model to clients and to the store."""

    family: Family
    source: ModelSource
    served_name: str
    fingerprint: str
    loaded_at: float

    @property
    def proto_dtype(self) -> tensor_pb2.DataType.ValueType:
        return TORCH_TO_PROTO[self.family.dtype]


def detect_family(source: ModelSource) -> type[Family]:
    """Pick the family from `config.model_type` (a checkpoint's own statement of its architecture)."""
    config = json.loads((source.path / "config.json").read_text())
    model_type = config.get("model_type", "")
    family = family_for(model_type)
    if family is None:
        supported = ", ".join(sorted(families()))
        raise FailedPrecondition(f"model type {model_type!r} is not supported (supported: {supported})", field="model")
    return family


def load_model(settings: Settings, *, part: str) -> LoadedModel:
    """Resolve, load and fingerprint the model named in settings for `part` (encoder|decoder|prompt: processor and config only)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per load is noise in service logs
    start = time.perf_counter()
    source = resolve_model(settings.model, revision=settings.model_revision, cache_dir=settings.cache_dir)
    family_cls = detect_family(source)
    dtype: torch.dtype | str = _DTYPES.get(settings.dtype, "auto") if settings.dtype != "auto" else "auto"
    family = family_cls.load(str(source.path), dtype=dtype, device=settings.device, part=part)
    family.attach_time_series(source.path, part)  # whatever the family: the adapter, if the checkpoint carries one
    if part == "encoder" and family.model is not None and settings.patch_embed_matmul:
        log.info("patch embeddings as matmuls: %d", patch_convs_as_linear(family.model))
    fingerprint = model_fingerprint(source.path, family=family_cls.name, dtype=dtype_name(family.dtype), revision=source.revision)
    served = settings.served_model_name or ("mmserve-tiny-random" if source.random_weights else settings.model)
    if source.random_weights:
        log.warning(
            "serving %s: a built-in tiny checkpoint with RANDOM WEIGHTS; its output is noise (demo/test only)",
            source.path.name,
        )
    log.info(
        "loaded %s (%s, %s) for the %s in %.1fs; fingerprint %s",
        settings.model,
        family_cls.name,
        dtype_name(family.dtype),
        part,
        time.perf_counter() - start,
        fingerprint,
    )
    return LoadedModel(family, source, served, fingerprint, time.time())
