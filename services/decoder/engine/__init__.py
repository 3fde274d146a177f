"""Engines behind the decoder servicer (see base.py for the boundary)."""

from __future__ import annotations

from mmserve.config import Settings
from mmserve.models.families import Family
from services.decoder.engine.base import Admission, Engine, EngineRequest, EngineStats, Finish, StepOutput, Usage

__all__ = ["Admission", "Engine", "EngineRequest", "EngineStats", "Finish", "StepOutput", "Usage", "make_engine"]


def make_engine(family: Family, settings: Settings) -> Engine:
    """The engine `MMSERVE_DECODER_ENGINE` names, for a loaded model."""
    from services.decoder.engine.builtin.engine import TransformersEngine

    return TransformersEngine(family, settings)
