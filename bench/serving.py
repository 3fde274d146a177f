"""Serving throughput and latency under concurrent load, optionally against a peer server.

    python bench/serving.py [--models tiny:qwen2_5_vl-tiny,tiny:qwen2_5_vl-mid | --url URL]
                            [--engine transformers|vllm [--vllm-venv DIR]] [--decoders N]
                            [--workload load|reuse] [--concurrency 1,4,8,16] [--requests N] [--tokens 64]
                            [--peer URL [--peer-model NAME] [--peer-pid PID] | --peer-json FILE | --peer-only]

For each model, starts Redis, an encoder, `--decoders` decoders (default 1;
round-robin from the gateway) with `--engine` (the vLLM engine runs from the
vLLM environment, scripts/build-vllm-env) and the gateway (the same commands
as `mmserve up`) on free loopback ports, or uses the gateway at `--url`; then,
with the official OpenAI SDK (streaming, `include_usage`), `--workload load`:

- load: at each concurrency level, `--requests` requests (default
  max(8, 2 x level)) kept `level` in flight, half text-only, half with one
  image (a distinct random PNG each, sent as a data URL), temperature 0,
  `--tokens` completion tokens with EOS ignored; reports aggregate completion
  tok/s (all completion tokens / wall time of the level), TTFT and
  inter-token latency (gaps between streamed chunks) p50/p99, time per output
  token after the first and end-to-end latency p50, request and error counts;
- images: TTFT of a fresh image and median TTFT of asking again about the same
  image (same data URL) `--repeats` times.

`--workload reuse` (why mmserve exists: embeddings shared by every replica):
`--images` distinct images (default 32), each asked about `--asks` times
(default 4) with a different question, in one random order, `--concurrency`
in flight (its first level), `--tokens` completion tokens; reports TTFT
p50/p99 (all, first asks, repeats), encoder calls (items run through a tower,
from the encoder's /metrics) and, for a vLLM peer, its prefix-cache and
multimodal-cache hit counts from its /metrics. Run it with `--decoders 2`.

With `--peer` (an OpenAI-compatible base URL, e.g. vLLM's
http://127.0.0.1:8001/v1) the very same requests go to the peer after
mmserve, and `ratio_*` keys give mmserve / peer (tok/s: above 1 means mmserve
is faster; TTFT and latencies: above 1 means mmserve is slower). `--peer-pid`
SIGSTOPs the peer's process tree while mmserve is started and measured (vLLM
busy-polls a core around requests) and SIGCONTs it for its own turn. `--peer-only`
measures just the peer; `--peer-json` takes the peer figures from an earlier
run's output line (same settings) instead of measuring again.

Prints one JSON line. Each side gets two warm-up requests first (one text-only, one with an image).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openai
from prometheus_client.parser import text_string_to_metric_families

from mmserve.config import Settings
from mmserve.launcher import LocalStack
from mmserve.samples import data_url, png_bytes

SUBJECTS = ("a lighthouse", "a train journey", "a lost key", "the ocean", "a mountain village", "a robot", "a garden", "a storm")


# --- workload -----------------------------------------------------------------------------------------


def square_png(size: int, seed: int) -> bytes:
    """A random-noise RGB PNG of size x size, distinct per seed."""
    return png_bytes(size, size, seed)


def text_messages(tag: str, i: int) -> list[dict[str, Any]]:
    """A text-only user turn, distinct per (tag, i) so that no two requests share a prompt."""
    text = f"Request {tag}-{i}: write a long story about {SUBJECTS[i % len(SUBJECTS)]}."
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def image_messages(url: str, question: str = "Describe this picture in detail.") -> list[dict[str, Any]]:
    """A user turn with one image (data URL) and a question."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]


def level_workload(level: int, n: int, size: int, seed: int) -> list[list[dict[str, Any]]]:
    """The requests of one concurrency level: text-only and one-image alternately."""
    return [
        text_messages(f"c{level}", i) if i % 2 == 0 else image_messages(data_url(square_png(size, seed + 1000 * level + i)))
        for i in range(n)
    ]


# --- one streamed request -----------------------------------------------------------------------------


@dataclass
class Result:
    """Client-side timings of one streamed chat completion."""

    ttft: float | None = None
    latency: float | None = None
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None


async def stream_one(client: openai.AsyncOpenAI, model: str, messages: list[dict[str, Any]], tokens: int) -> Result:
    """Send one streaming request; time the first content chunk and the gaps between later ones."""
    result = Result()
    start = time.perf_counter()
    last: float | None = None
    try:
        stream = await client.chat.completions.create(  # type: ignore[call-overload]
            model=model,
            messages=messages,
            temperature=0,
            max_completion_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = 0
        async for chunk in stream:
            if chunk.usage is not None:
                result.completion_tokens = chunk.usage.completion_tokens
            if not chunk.choices or not chunk.choices[0].delta.content:
                continue
            now = time.perf_counter()
            chunks += 1
            if last is None:
                result.ttft = now - start
            else:
                result.gaps.append(now - last)
            last = now
        result.latency = time.perf_counter() - start
        if result.ttft is None:
            result.error = "no content streamed"
        elif not result.completion_tokens:
            result.completion_tokens = chunks  # no usage chunk: count chunks instead
    except openai.OpenAIError as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


# --- statistics ---------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), rounded; None for no values."""
    return round(float(np.percentile(values, q)), 4) if values else None


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


async def run_requests(
    client: openai.AsyncOpenAI, model: str, workload: list[list[dict[str, Any]]], level: int, tokens: int
) -> tuple[list[Result], float]:
    """Send the workload in order with `level` requests in flight at all times: results in workload order, and the wall time."""
    results: list[Result] = [Result() for _ in workload]
    pending = iter(enumerate(workload))

    async def worker() -> None:
        for i, messages in pending:
            results[i] = await stream_one(client, model, messages, tokens)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(level)))
    return results, time.perf_counter() - start


async def run_level(
    client: openai.AsyncOpenAI, model: str, workload: list[list[dict[str, Any]]], level: int, tokens: int
) -> dict[str, Any]:
    """Run the workload with `level` requests in flight at all times; summarise it."""
    results, wall = await run_requests(client, model, workload, level, tokens)
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    completion = sum(r.completion_tokens for r in ok)
    summary: dict[str, Any] = {
        "concurrency": level,
        "requests": len(results),
        "errors": len(errors),
        "incomplete": sum(r.completion_tokens != tokens for r in ok),
        "wall_s": round(wall, 3),
        "completion_tokens": completion,
        "tok_s": round(completion / wall, 2),
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p99_s": pct(ttfts, 99),
        "itl_p50_s": pct(gaps, 50),
        "itl_p99_s": pct(gaps, 99),
        "tpot_p50_s": pct(
            [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok if r.latency and r.ttft and r.completion_tokens > 1], 50
        ),
        "latency_p50_s": pct([r.latency for r in ok if r.latency is not None], 50),
    }
    if errors:
        summary["first_error"] = errors[0]
    return summary


async def ttft(client: openai.AsyncOpenAI, model: str, messages: list[dict[str, Any]]) -> float | None:
    """TTFT of one request alone (8 completion tokens); None if it failed."""
    result = await stream_one(client, model, messages, 8)
    if result.error is not None:
        print(f"serving bench: TTFT probe failed: {result.error}", file=sys.stderr)
    return result.ttft


async def warm_up(client: openai.AsyncOpenAI, base_url: str, model: str | None, ns: argparse.Namespace) -> str:
    """The model's name; one text-only and one image request first, as the workloads mix them."""
    if model is None:
        model = (await client.models.list()).data[0].id
    for messages in (text_messages("warm-up", 0), image_messages(data_url(square_png(ns.size, ns.seed - 1)))):
        warm = await stream_one(client, model, messages, ns.tokens)
        if warm.error is not None:
            raise RuntimeError(f"warm-up request to {base_url} failed: {warm.error}")
    return model


def counters(url: str | None, prefixes: tuple[str, ...]) -> dict[str, float]:
    """Sum of each counter family named by `prefixes` at a Prometheus /metrics URL ({} if unreachable or None)."""
    if url is None:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(prefixes):
            out[family.name] = out.get(family.name, 0.0) + sum(s.value for s in family.samples if s.name.endswith("_total"))
    return out


#: Counters the reuse workload reads: mmserve's encoder, and a vLLM peer's caches.
REUSE_COUNTERS = ("mmserve_encoder_items_encoded", "mmserve_encoder_cache_hits", "vllm:prefix_cache", "vllm:mm_cache")


async def measure_reuse(base_url: str, model: str | None, ns: argparse.Namespace, metrics_url: str | None) -> dict[str, Any]:
    """The reuse workload: `images` distinct images, each asked `asks` times, in one seeded random order."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "bench"), max_retries=0, timeout=900)
    try:
        model = await warm_up(client, base_url, model, ns)
        urls = [data_url(square_png(ns.size, ns.seed + 700_000 + i)) for i in range(ns.images)]
        order = [(i, k) for i in range(ns.images) for k in range(ns.asks)]
        random.Random(ns.seed).shuffle(order)
        workload = [image_messages(urls[i], f"Question {k}: what do you see in this picture?") for i, k in order]
        before = counters(metrics_url, REUSE_COUNTERS)
        results, wall = await run_requests(client, model, workload, ns.concurrency[0], ns.tokens)
        after = counters(metrics_url, REUSE_COUNTERS)
    finally:
        await client.close()
    first_of: dict[int, int] = {}
    for position, (image, _) in enumerate(order):
        first_of.setdefault(image, position)
    first = [position in first_of.values() for position in range(len(order))]  # the first ask of its image
    ttfts = [r.ttft for r in results if r.ttft is not None]
    return {
        "base_url": base_url,
        "model": model,
        "requests": len(results),
        "errors": sum(r.error is not None for r in results),
        "wall_s": round(wall, 3),
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p99_s": pct(ttfts, 99),
        "ttft_first_ask_p50_s": pct([r.ttft for r, f in zip(results, first, strict=True) if f and r.ttft is not None], 50),
        "ttft_repeat_p50_s": pct([r.ttft for r, f in zip(results, first, strict=True) if not f and r.ttft is not None], 50),
        "counters": {name: after[name] - before.get(name, 0.0) for name in after},
    }


async def measure(base_url: str, model: str | None, ns: argparse.Namespace) -> dict[str, Any]:
    """All figures for one server: warm-up, the load levels, then the image TTFTs."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "bench"), max_retries=0, timeout=900)
    try:
        model = await warm_up(client, base_url, model, ns)
        levels = {}
        for level in ns.concurrency:
            n = ns.requests or max(8, 2 * level)
            levels[f"c{level}"] = await run_level(client, model, level_workload(level, n, ns.size, ns.seed), level, ns.tokens)
            print(f"serving bench: {base_url} {json.dumps(levels[f'c{level}'])}", file=sys.stderr)
        same = data_url(square_png(ns.size, ns.seed + 500_000))
        await ttft(client, model, image_messages(same))  # the first time this image is seen
        repeats = [
            await ttft(client, model, image_messages(same, f"Question {k}: what else is in this picture?")) for k in range(ns.repeats)
        ]
        fresh = [await ttft(client, model, image_messages(data_url(square_png(ns.size, ns.seed + 600_000 + k)))) for k in range(ns.repeats)]
    finally:
        await client.close()
    return {
        "base_url": base_url,
        "model": model,
        "levels": levels,
        "ttft_repeat_image_s": median([t for t in repeats if t is not None]),
        "ttft_new_image_s": median([t for t in fresh if t is not None]),
    }


def add_summary(side: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    """Self-scaling (tok/s at the highest level / at the lowest) and the latencies at the lowest level."""
    lo, hi = side["levels"][f"c{min(levels)}"], side["levels"][f"c{max(levels)}"]
    if lo["tok_s"]:
        side[f"self_scaling_c{max(levels)}_over_c{min(levels)}"] = round(hi["tok_s"] / lo["tok_s"], 3)
    for key in ("ttft_p50_s", "itl_p50_s", "latency_p50_s"):
        side[f"{key[:-2]}_c{min(levels)}_s"] = lo[key]
    return side


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(ours: dict[str, Any], peer: dict[str, Any], levels: list[int]) -> dict[str, float | None]:
    """mmserve / peer for every comparable figure."""
    out: dict[str, float | None] = {}
    for level in levels:
        a, b = ours["levels"][f"c{level}"], peer["levels"][f"c{level}"]
        out[f"ratio_tok_s_c{level}"] = ratio(a["tok_s"], b["tok_s"])
        for key in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "latency_p50_s"):
            out[f"ratio_{key[:-2]}_c{level}"] = ratio(a[key], b[key])
    out["ratio_ttft_repeat_image"] = ratio(ours["ttft_repeat_image_s"], peer["ttft_repeat_image_s"])
    out["ratio_ttft_new_image"] = ratio(ours["ttft_new_image_s"], peer["ttft_new_image_s"])
    return out


# --- processes ----------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (psutil if installed, else /proc)."""
    try:
        import psutil

        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except ImportError:
        pass
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo.extend(children.get(current, []))
    return tree


@contextmanager
def paused(pid: int | None) -> Iterator[None]:
    """SIGSTOP the process tree of `pid` (if given) for the duration; SIGCONT it afterwards, whatever happens."""
    if pid is None:
        yield
        return
    tree = process_tree(pid)
    stopped = []
    try:
        for p in tree:
            with suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
                stopped.append(p)
        yield
    finally:
        for p in reversed(stopped):
            with suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


# --- main ---------------------------------------------------------------------------------------------


SETTINGS_KEYS = ("workload", "concurrency", "requests", "tokens", "size", "repeats", "images", "asks", "seed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--models",
        "--model",
        default="tiny:qwen2_5_vl-tiny,tiny:qwen2_5_vl-mid",
        help="comma-separated models; a stack is started for each",
    )
    target.add_argument(
        "--url", help="base URL of an already running mmserve gateway (e.g. http://127.0.0.1:8000/v1) instead of starting stacks"
    )
    target.add_argument("--peer-only", action="store_true", help="measure only the peer")
    parser.add_argument("--workload", choices=("load", "reuse"), default="load", help="see the module docstring")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers", help="the started decoders' engine")
    parser.add_argument("--vllm-venv", type=Path, help="environment of vLLM-engine decoders (default: .venv-vllm)")
    parser.add_argument("--decoders", type=int, default=1, help="decoder replicas in each started stack")
    parser.add_argument("--concurrency", default=None, help="comma-separated concurrency levels (default 1,4,8,16; reuse: 4)")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x level))")
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per request (EOS ignored)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="requests for each image TTFT median")
    parser.add_argument("--images", type=int, default=32, help="reuse: distinct images")
    parser.add_argument("--asks", type=int, default=4, help="reuse: questions about each image")
    parser.add_argument("--seed", type=int, default=17)
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--peer", help="OpenAI-compatible base URL of a peer server, e.g. http://127.0.0.1:8001/v1")
    peer.add_argument("--peer-json", type=Path, help="take the peer figures from an earlier output line of this script instead")
    parser.add_argument("--peer-model", help="model name at the peer (default: the first id of its /v1/models)")
    parser.add_argument("--peer-pid", type=int, help="PID of the peer server: SIGSTOPped (with its children) while mmserve runs")
    parser.add_argument(
        "--stack-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the started services; repeatable"
    )
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    ns = parser.parse_args()
    ns.concurrency = [int(c) for c in (ns.concurrency or ("4" if ns.workload == "reuse" else "1,4,8,16")).split(",")]
    if ns.peer_only and not ns.peer:
        parser.error("--peer-only needs --peer")
    return ns


def measure_side(base_url: str, model: str | None, ns: argparse.Namespace, metrics_url: str | None) -> dict[str, Any]:
    """One server's figures for the chosen workload."""
    if ns.workload == "reuse":
        return asyncio.run(measure_reuse(base_url, model, ns, metrics_url))
    return add_summary(asyncio.run(measure(base_url, model, ns)), ns.concurrency)


def compare(ours: dict[str, Any], peer: dict[str, Any], ns: argparse.Namespace) -> dict[str, float | None]:
    """mmserve / peer ratios for the chosen workload."""
    if ns.workload == "reuse":
        return {
            f"ratio_{key[:-2]}": ratio(ours[key], peer[key])
            for key in ("ttft_p50_s", "ttft_p99_s", "ttft_first_ask_p50_s", "ttft_repeat_p50_s")
        }
    return ratios(ours, peer, ns.concurrency)


def main() -> None:
    ns = parse_args()
    settings = {key: getattr(ns, key) for key in SETTINGS_KEYS}
    out: dict[str, Any] = {"bench": "serving", "cpus": os.cpu_count(), "settings": settings, "engine": ns.engine, "decoders": ns.decoders}

    peer: dict[str, Any] | None = None
    if ns.peer_json is not None:
        earlier = json.loads(ns.peer_json.read_text().strip().splitlines()[-1])
        if earlier.get("settings") != settings:
            sys.exit(f"serving bench: {ns.peer_json} was measured with {earlier.get('settings')}, not {settings}")
        peer = earlier["peer"]
        out["peer_from"] = str(ns.peer_json)

    runs = []
    if not ns.peer_only:
        with paused(ns.peer_pid):
            if ns.url:
                runs.append(measure_side(ns.url, None, ns, None))
            else:
                extra_env = dict(item.split("=", 1) for item in ns.stack_env)
                for model in ns.models.split(","):
                    stack = LocalStack(model, ns.cache_dir, extra_env, engine=ns.engine, decoders=ns.decoders, vllm_venv=ns.vllm_venv)
                    try:
                        run = measure_side(stack.base_url, None, ns, stack.encoder_metrics_url)
                    finally:
                        stack.close()
                    runs.append({"mmserve_model": model, **run})
        out["runs"] = runs
        out["peer_paused_during_mmserve"] = ns.peer_pid is not None

    if ns.peer:
        try:
            peer = measure_side(ns.peer, ns.peer_model, ns, ns.peer.rstrip("/").removesuffix("/v1") + "/metrics")
        except (openai.OpenAIError, RuntimeError) as exc:  # keep mmserve's figures
            if ns.peer_only:
                raise
            out["peer_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if peer is not None:
        out["peer"] = peer
        for run in runs:
            run.update(compare(run, peer, ns))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
