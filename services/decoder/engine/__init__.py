"""Engines behind the decoder servicer (see base.py for the boundary)."""

from __future__ import annotations

from mmserve.config import Settings
from mmserve.models.loading import LoadedModel
from services.decoder.engine.base import Admission, Engine, EngineRequest, EngineStats, Finish, StepOutput, Usage

__all__ = ["Admission", "Engine", "EngineRequest", "EngineStats", "Finish", "StepOutput", "Usage", "make_engine", "model_part"]


def model_part(settings: Settings) -> str:
    """What the decoder loads for its engine: the language model, or only the prompt side when vLLM loads the weights."""
    return "prompt" if settings.decoder_engine == "vllm" else "decoder"


def make_engine(model: LoadedModel, settings: Settings) -> Engine:
    """The engine `MMSERVE_DECODER_ENGINE` names, for a model loaded with `model_part(settings)`."""
    if settings.decoder_engine == "vllm":
        from services.decoder.engine.vllm.engine import VllmEngine

        return VllmEngine(model.family, str(model.source.path), settings)
    from services.decoder.engine.builtin.engine import TransformersEngine

    return TransformersEngine(model.family, settings)
