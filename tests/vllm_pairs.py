"""Pairs of decoders, one per engine (built-in and vLLM), on one checkpoint: what the vLLM tests compare.

One encoder and one Redis serve both decoders, each behind its own gateway, so
every request can go to both. A start costs 30-40 s (vLLM's) and an idle vLLM
keeps a core busy, so the session holds at most one pair (`PairPool`, the
`vllm_pairs` fixture of tests/conftest.py): modules asking for the same
checkpoint in a row share it, another checkpoint replaces it, and it is
stopped as soon as the next test needs none.

The pairs run vLLM eagerly (`MMSERVE_VLLM_ENFORCE_EAGER`): compiling the model
is most of a CPU start here, and what these tests compare, the embeddings and
prompts mmserve feeds vLLM, does not depend on it. `mmserve up --engine vllm`
in tests/test_vllm_engine.py runs the default, compiled one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai

from mmserve.launcher import vllm_decoder
from mmserve.localredis import LocalRedis
from tests.conftest import CACHE_DIR, RunningService, StartService, stop_all


@dataclass
class Pair:
    encoder: RunningService
    builtin: RunningService  # decoders
    vllm: RunningService
    builtin_client: openai.OpenAI
    vllm_client: openai.OpenAI


@contextmanager
def serving_pair(start_service: StartService, vllm_env: Path, checkpoint: str) -> Iterator[Pair]:
    """Encoder, Redis, and one decoder per engine on `checkpoint`, each behind a gateway; all stopped at exit."""
    with LocalRedis() as redis:
        resolved, venv = vllm_decoder(f"tiny:{checkpoint}", None, CACHE_DIR, vllm_env)  # as mmserve up --engine vllm does
        # Everything starts at once and is waited for together: the model loads overlap vLLM's start.
        encoder = start_service("encoder", redis_url=redis.url, wait=False, **resolved)
        wired = {"redis_url": redis.url, "MMSERVE_ENCODER_TARGET": encoder.target, "wait": False, **resolved}
        builtin = start_service("decoder", **wired)
        vllm = start_service(
            "decoder", venv=venv, MMSERVE_DECODER_ENGINE="vllm", MMSERVE_VLLM_CPU_KV_CACHE_GIB="1",
            MMSERVE_MAX_MODEL_LEN="4096", MMSERVE_VLLM_ENFORCE_EAGER="true", **wired,
        )  # fmt: skip
        gateways = [start_service("gateway", wait=False, MMSERVE_DECODER_TARGET=d.target) for d in (builtin, vllm)]
        try:
            for service, timeout in ((encoder, 180), (builtin, 180), (vllm, 900), *((g, 180) for g in gateways)):
                service.wait_ready(timeout)  # the gateways last: their /health is OK once their decoder serves
            clients = [openai.OpenAI(base_url=g.base_url, api_key="x", max_retries=0) for g in gateways]
            yield Pair(encoder, builtin, vllm, *clients)
        finally:
            stop_all((vllm, *gateways, builtin, encoder))


class PairPool:
    """At most one running pair, kept while tests ask for its checkpoint (see the module docstring)."""

    def __init__(self, start_service: StartService, vllm_env: Path) -> None:
        self._start_service, self._vllm_env = start_service, vllm_env
        self._open: tuple[str, Pair, ExitStack] | None = None

    def get(self, checkpoint: str) -> Pair:
        """The pair on `checkpoint`: the running one, or a new one in place of a pair on another checkpoint."""
        if self._open is not None and self._open[0] == checkpoint:
            return self._open[1]
        self.close()
        stack = ExitStack()
        pair = stack.enter_context(serving_pair(self._start_service, self._vllm_env, checkpoint))
        self._open = (checkpoint, pair, stack)
        return pair

    def close(self) -> None:
        """Stop the running pair, if any."""
        if self._open is not None:
            _, _, stack = self._open
            self._open = None
            stack.close()
