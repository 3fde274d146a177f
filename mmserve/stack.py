"""`mmserve up`: the whole stack on one machine, in the foreground.

Redis (a private `redis-server` when MMSERVE_REDIS_URL is not set,
persistent in a data dir unless told otherwise: precomputed embeddings are
user data), one encoder, one decoder and the gateway, each started with the
same command as in compose and in the tests, sharing one service token
(MMSERVE_SERVICE_TOKEN, or a random one per run); waits until every one is
healthy, prints the URL, and on Ctrl-C or SIGTERM stops them in reverse
order, gracefully (Redis last, so its file has every write).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from mmserve.config import Settings
from mmserve.launcher import ServiceProcess, vllm_decoder
from mmserve.localredis import LocalRedis
from mmserve.rpc.health import wait_serving

log = logging.getLogger("mmserve.up")


class _Stop(Exception):
    pass


def wait_http_ok(url: str, *, timeout: float, alive: object = None) -> None:
    """Poll `url` until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if callable(alive) and not alive():
            raise RuntimeError(f"the process serving {url} exited before it became healthy")
        time.sleep(0.25)
    raise TimeoutError(f"{url} was not healthy within {timeout:.0f}s")


def local_redis(settings: Settings) -> LocalRedis:
    """The private redis-server `mmserve up` starts (not yet started): persistent per the settings."""
    return LocalRedis(data_dir=settings.local_redis_dir())


#: Loading a large append-only file takes a while; PING answers only after it.
REDIS_START_TIMEOUT_S = 300.0


def stack_token(settings: Settings) -> str:
    """The stack's service token: MMSERVE_SERVICE_TOKEN if set, else a random one for this run (never printed)."""
    if settings.service_token is not None:
        return settings.service_token.get_secret_value()
    log.info(
        "made a random service token for this stack: its gRPC ports serve only its own processes "
        "(set MMSERVE_SERVICE_TOKEN to choose one, e.g. to call them with `mmserve encode`)"
    )
    return secrets.token_urlsafe(32)


def run_stack(settings: Settings, *, vllm_venv: Path | None = None, startup_timeout: float = 900.0) -> int:
    """Run until interrupted; 0 on a clean stop, 1 if a service failed.

    With the vLLM engine (MMSERVE_DECODER_ENGINE=vllm) the decoder runs from the vLLM environment (see
    `vllm_decoder`), and every service is given the resolved model folder.
    """

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    redis: LocalRedis | None = None
    services: list[ServiceProcess] = []
    try:
        redis_url = settings.redis_url
        if "MMSERVE_REDIS_URL" not in os.environ:
            redis = local_redis(settings).start(timeout=REDIS_START_TIMEOUT_S)
            redis_url = redis.url
            kept = f"persistent in {redis.data_dir}" if redis.data_dir else "memory only: embeddings are lost when it stops"
            log.info("started a private redis-server at %s, %s (set MMSERVE_REDIS_URL to use your own)", redis_url, kept)
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        env = {
            "MMSERVE_SERVICE_TOKEN": stack_token(settings),
            "MMSERVE_DECODER_ENGINE": settings.decoder_engine,
            "MMSERVE_REDIS_URL": redis_url,
            "MMSERVE_ENCODER_TARGET": f"{host}:{settings.encoder_port}",
            "MMSERVE_DECODER_TARGET": f"{host}:{settings.decoder_port}",
        }
        decoder_venv = None
        if settings.decoder_engine == "vllm":
            resolved, decoder_venv = vllm_decoder(settings.model, settings.model_revision, settings.cache_dir, vllm_venv)
            env.update(resolved)
        services.append(ServiceProcess("encoder", env).start())
        services.append(ServiceProcess("decoder", env, venv=decoder_venv).start())
        wait_serving(env["MMSERVE_ENCODER_TARGET"], timeout=startup_timeout, alive=services[0].alive)
        wait_serving(env["MMSERVE_DECODER_TARGET"], timeout=startup_timeout, alive=services[1].alive)
        services.append(ServiceProcess("gateway", env).start())
        base = f"http://{host}:{settings.gateway_port}"
        wait_http_ok(f"{base}/health", timeout=60, alive=services[2].alive)
        print(
            f"\nmmserve is up: {base}/v1  (OpenAI-compatible; model list at {base}/v1/models)\n"
            f"  try: curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
            '-d \'{"messages":[{"role":"user","content":"Hello"}],"max_tokens":16}\'\n'
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        if settings.model == "tiny":
            log.warning("the default model is a tiny checkpoint with RANDOM WEIGHTS: answers are noise (set MMSERVE_MODEL)")
        while all(s.alive() for s in services):
            time.sleep(0.5)
        failed = [s.role for s in services if not s.alive()]
        log.error("service(s) exited unexpectedly: %s; stopping the stack", ", ".join(failed))
        return 1
    except _Stop:
        log.info("stopping")
        return 0
    except (TimeoutError, RuntimeError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for service in reversed(services):
            service.stop()
        if redis is not None:
            redis.stop()


def main(argv: list[str]) -> int:
    """Run the whole stack on this machine (Redis, encoder, decoder, gateway)."""
    import argparse

    from mmserve.log import setup_logging

    parser = argparse.ArgumentParser(prog="mmserve up", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id, local folder, or tiny (default: MMSERVE_MODEL or tiny)")
    parser.add_argument("--port", type=int, help="gateway HTTP port (default: MMSERVE_GATEWAY_PORT or 8000)")
    parser.add_argument(
        "--engine", choices=("transformers", "vllm"), help="decoder engine (default: MMSERVE_DECODER_ENGINE or transformers)"
    )
    parser.add_argument(
        "--vllm-venv", type=Path, help="environment of the vLLM decoder (default: this one if it has vLLM, else .venv-vllm)"
    )
    parser.add_argument("--no-persist", action="store_true", help="keep the private Redis in memory only (MMSERVE_REDIS_PERSIST=false)")
    ns = parser.parse_args(argv)
    if ns.no_persist:
        os.environ["MMSERVE_REDIS_PERSIST"] = "false"
    if ns.engine:
        os.environ["MMSERVE_DECODER_ENGINE"] = ns.engine
    if ns.model:
        os.environ["MMSERVE_MODEL"] = ns.model
    if ns.port:
        os.environ["MMSERVE_GATEWAY_PORT"] = str(ns.port)
    settings = Settings()
    setup_logging("up", level=settings.log_level, json_logs=settings.log_json)
    return run_stack(settings, vllm_venv=ns.vllm_venv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
