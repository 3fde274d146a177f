"""Run the gateway: `mmserve gateway` (configured by MMSERVE_* env vars)."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.server import server_config
from mmserve.cli import role_arguments
from mmserve.config import Settings
from mmserve.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    """Run the OpenAI-compatible REST gateway."""
    role_arguments("gateway", __doc__, argv)
    settings = Settings()
    setup_logging("gateway", level=settings.log_level, json_logs=settings.log_json)
    uvicorn.Server(server_config(create_app(settings), settings)).run()
    return 0
