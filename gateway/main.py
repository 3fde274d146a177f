"""Run the gateway: `mmserve gateway` (configured by MMSERVE_* env vars)."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.server import server_config
from mmserve.config import Settings
from mmserve.log import setup_logging


def main() -> None:
    settings = Settings()
    setup_logging("gateway", level=settings.log_level, json_logs=settings.log_json)
    uvicorn.Server(server_config(create_app(settings), settings)).run()
