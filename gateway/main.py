"""Run the gateway: `mmserve gateway` (configured by MMSERVE_* env vars)."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from mmserve.config import Settings
from mmserve.log import setup_logging


def main() -> None:
    settings = Settings()
    setup_logging("gateway", level=settings.log_level, json_logs=settings.log_json)
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.gateway_port,
        log_config=None, access_log=False, timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
