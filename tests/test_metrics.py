"""Prometheus metrics: after real requests, the counters on all three services moved as they should.

Names follow docs/architecture.md, "Metrics and logs" (one `mmserve_` prefix, base units, no colons,
low-cardinality labels); the gateway serves /metrics on its HTTP port, each
gRPC service on its own metrics port.
"""

from __future__ import annotations

import re

from tests.conftest import Stack
from tests.support import data_url, png_bytes, scrape


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counts_move_as_expected_on_every_service(stack: Stack) -> None:
    urls = {
        name: service.metrics_url for name, service in (("gateway", stack.gateway), ("decoder", stack.decoder), ("encoder", stack.encoder))
    }
    before = {name: scrape(url) for name, url in urls.items()}
    client = stack.client()
    content = [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=811))}}]
    first = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": content}], max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    second = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": content}], max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": "Hello"}],
            max_completion_tokens=3,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks and first.usage.completion_tokens == second.usage.completion_tokens == 5
    after = {name: scrape(url) for name, url in urls.items()}

    g0, g1 = before["gateway"], after["gateway"]
    route = 'outcome="200",rpc="/v1/chat/completions",service="gateway"'
    assert delta(g0, g1, f"mmserve_requests_total{{{route}}}") == 3
    assert delta(g0, g1, 'mmserve_request_duration_seconds_count{rpc="/v1/chat/completions",service="gateway"}') == 3

    d0, d1 = before["decoder"], after["decoder"]
    assert delta(d0, d1, 'mmserve_requests_total{outcome="OK",rpc="Generate",service="decoder"}') == 3
    prompt = first.usage.prompt_tokens + second.usage.prompt_tokens + 0
    assert delta(d0, d1, "mmserve_prompt_tokens_total") >= prompt + 1
    assert delta(d0, d1, "mmserve_generation_tokens_total") == 5 + 5 + 3
    for histogram in ("mmserve_time_to_first_token_seconds", "mmserve_e2e_request_latency_seconds", "mmserve_request_queue_time_seconds"):
        assert delta(d0, d1, f"{histogram}_count") == 3, histogram
    assert delta(d0, d1, "mmserve_inter_token_latency_seconds_count") == 4 + 4 + 2
    assert d1["mmserve_num_requests_running"] == 0 and d1["mmserve_num_requests_waiting"] == 0
    assert d1['mmserve_requests_in_flight{service="decoder"}'] == 0

    e0, e1 = before["encoder"], after["encoder"]
    assert delta(e0, e1, 'mmserve_requests_total{outcome="OK",rpc="Encode",service="encoder"}') == 2
    assert delta(e0, e1, 'mmserve_encoder_cache_misses_total{modality="image"}') == 1
    assert delta(e0, e1, 'mmserve_encoder_cache_hits_total{modality="image"}') == 1
    assert delta(e0, e1, 'mmserve_encode_seconds_count{modality="image"}') == 1
    assert delta(e0, e1, "mmserve_store_bytes_written_total") == 6 * 128 * 4  # one 6-token float32 embedding
    assert e1["mmserve_store_bytes"] > 0


def test_metric_names_follow_the_conventions(stack: Stack) -> None:
    for service in (stack.gateway, stack.decoder, stack.encoder):
        names = {key.split("{")[0] for key in scrape(service.metrics_url)}
        ours = {n for n in names if n.startswith("mmserve_")}
        assert ours, service.process.role
        for name in ours:
            assert re.fullmatch(r"mmserve_[a-z0-9_]+", name), name
            assert ":" not in name
        for key in scrape(service.metrics_url):
            assert "mmemb-" not in key and "uuid" not in key  # never an id in a label
