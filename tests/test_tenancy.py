"""Tenants: every API key is one, and what a tenant stores exists for it alone.

One real stack (redis-server, encoder, decoder, gateway as processes, with a
service token) and one store, keys from all three sources at once:
MMSERVE_API_KEYS (alice, bob), MMSERVE_API_KEYS_FILE (carol) and the old single
MMSERVE_API_KEY. Through the official openai SDK, bob can neither GET, chat
with nor DELETE alice's uuids or content ids, and every answer he gets is the
answer for an id nobody stored (same status, same error shape, same message
with the id in it). The same media encoded by both is two records under one
content id: bob's encode runs the model (`cached: false`, a cache miss in the
encoder's metrics), so nothing tells him alice had it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mmserve.localredis import LocalRedis
from mmserve.samples import data_url, png_bytes
from mmserve.tenancy import single_key_tenant
from tests.conftest import Stack, start_inprocess_stack
from tests.inprocess import InProcessServices
from tests.support import redis_keys, scrape

MODEL = "mmserve-tiny-random"
KEYS = {"alice": "sk-alice-1", "bob": "sk-bob-1"}
CAROL_KEY = "sk-carol-from-file"
LEGACY_KEY = "sk-legacy-single"
MISSES = 'mmserve_encoder_cache_misses_total{modality="image"}'


@pytest.fixture(scope="module")
def tenants_stack(inprocess: InProcessServices, module_redis: LocalRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text(f"# tenant:key, one a line\n\ncarol:{CAROL_KEY}\n")
    stack = start_inprocess_stack(
        inprocess, module_redis.url,
        api_keys=",".join(f"{t}:{k}" for t, k in KEYS.items()), api_keys_file=keys_file,
        api_key=LEGACY_KEY, service_token=secrets.token_urlsafe(24),
    )  # fmt: skip
    yield stack
    stack.stop()


def client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway.base_url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def alice(tenants_stack: Stack) -> openai.OpenAI:
    return client(tenants_stack, KEYS["alice"])


@pytest.fixture(scope="module")
def bob(tenants_stack: Stack) -> openai.OpenAI:
    return client(tenants_stack, KEYS["bob"])


def encode(who: openai.OpenAI, *parts: dict[str, Any]) -> list[dict[str, Any]]:
    return who.post("/mm/encode", body={"content": list(parts)}, cast_to=object)["data"]  # type: ignore[index, no-any-return]


def image(seed: int, uuid: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=seed))}}
    return {**part, "uuid": uuid} if uuid else part


def by_ref(ref: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": None, "uuid": ref}


def ask(who: openai.OpenAI, ref: str) -> str:
    reply = who.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Look:"}, by_ref(ref)]}],
        max_completion_tokens=4, temperature=0,
    )  # fmt: skip
    return reply.choices[0].message.content or ""


def failure(call: Any) -> tuple[int, dict[str, Any]]:
    """(status, error body) of an SDK call that must fail."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.response.json()["error"]


def same_as_absent(attempt: Any, absent: Any, ref: str, never: str) -> None:
    """Another tenant's id fails exactly like an id never stored: status, type, code, param, message (id aside)."""
    status, err = failure(attempt)
    status_absent, err_absent = failure(absent)
    assert status == status_absent == 404, (err, err_absent)
    assert {k: v for k, v in err.items() if k != "message"} == {k: v for k, v in err_absent.items() if k != "message"}
    assert err["message"].replace(ref, "<id>") == err_absent["message"].replace(never, "<id>")


def test_every_key_source_is_a_tenant_and_others_are_refused(tenants_stack: Stack) -> None:
    for key in (*KEYS.values(), CAROL_KEY, LEGACY_KEY):
        assert [m.id for m in client(tenants_stack, key).models.list().data] == [MODEL]
    for wrong in ("sk-nobody", KEYS["alice"] + "x", KEYS["alice"][:-1], f"{KEYS['alice']},{KEYS['bob']}"):
        status, err = failure(lambda k=wrong: client(tenants_stack, k).models.list())
        assert status == 401 and err["code"] == "invalid_api_key"
    for headers in ({}, {"authorization": f"Basic {KEYS['alice']}"}):  # no key at all, or not a bearer token
        reply = httpx.get(f"{tenants_stack.gateway.base_url}/models", headers=headers, timeout=30)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_another_tenant_cannot_read_use_delete_or_probe(tenants_stack: Stack, alice: openai.OpenAI, bob: openai.OpenAI) -> None:
    by_uuid, by_content = encode(alice, image(801, uuid="holiday-1"), image(802))
    cid = by_content["id"]
    assert by_uuid["id"] == "holiday-1" and cid.startswith("mmemb-")
    never_uuid, never_cid = "never-stored-1", "mmemb-" + secrets.token_hex(32)

    for ref, never in ((by_uuid["id"], never_uuid), (cid, never_cid)):
        same_as_absent(lambda r=ref: bob.get(f"/mm/embeddings/{r}", cast_to=object),
                       lambda n=never: bob.get(f"/mm/embeddings/{n}", cast_to=object), ref, never)  # fmt: skip
        same_as_absent(lambda r=ref: ask(bob, r), lambda n=never: ask(bob, n), ref, never)
        # An Encode that names the reference (no payload) is a probe too.
        same_as_absent(lambda r=ref: encode(bob, by_ref(r)), lambda n=never: encode(bob, by_ref(n)), ref, never)
        assert bob.delete(f"/mm/embeddings/{ref}", cast_to=object) == bob.delete(f"/mm/embeddings/{never}", cast_to=object) | {"id": ref}
        assert bob.delete(f"/mm/embeddings/{ref}", cast_to=object)["deleted"] is False  # type: ignore[index]

        # Untouched for its owner: described, usable in chat.
        assert alice.get(f"/mm/embeddings/{ref}", cast_to=object)["id"] == ref  # type: ignore[index]
        assert ask(alice, ref)

    # The same uuid is free for bob: his own embedding, no conflict with alice's.
    (his,) = encode(bob, image(803, uuid="holiday-1"))
    assert his["cached"] is False and his["content_sha256"] != by_uuid["content_sha256"]
    assert alice.get("/mm/embeddings/holiday-1", cast_to=object)["content_sha256"] == by_uuid["content_sha256"]  # type: ignore[index]

    # Alice deletes hers; bob's stays.
    assert alice.delete(f"/mm/embeddings/{cid}", cast_to=object)["deleted"] is True  # type: ignore[index]
    assert alice.delete("/mm/embeddings/holiday-1", cast_to=object)["deleted"] is True  # type: ignore[index]
    assert bob.get("/mm/embeddings/holiday-1", cast_to=object)["content_sha256"] == his["content_sha256"]  # type: ignore[index]


def test_same_media_in_two_tenants_is_two_records(tenants_stack: Stack, alice: openai.OpenAI, bob: openai.OpenAI) -> None:
    """One content id, one record per tenant: bob's first encode is a real encode, never `cached` off alice's."""
    part = image(811)
    (first,) = encode(alice, part)
    assert first["cached"] is False
    assert encode(alice, part)[0]["cached"] is True

    misses = scrape(tenants_stack.encoder.metrics_url).get(MISSES, 0.0)
    (bobs,) = encode(bob, part)
    assert bobs["id"] == first["id"] and bobs["cached"] is False  # as if nobody had it
    assert scrape(tenants_stack.encoder.metrics_url)[MISSES] == misses + 1  # the tower ran: his own record
    assert encode(bob, part)[0]["cached"] is True

    carol = client(tenants_stack, CAROL_KEY)
    assert encode(carol, part)[0]["cached"] is False  # a tenant from the keys file is one more namespace

    cid = first["id"]
    slots = {k.split("{", 1)[1].split("}", 1)[0] for k in redis_keys(tenants_stack.redis_url) if cid in k}
    assert slots == {f"c:alice:{cid}", f"c:bob:{cid}", f"c:carol:{cid}"}
    assert bob.delete(f"/mm/embeddings/{cid}", cast_to=object)["deleted"] is True  # type: ignore[index]
    assert alice.get(f"/mm/embeddings/{cid}", cast_to=object)["id"] == cid  # type: ignore[index]
    assert ask(alice, cid)


def test_the_single_api_key_keeps_its_tenant(tenants_stack: Stack) -> None:
    """MMSERVE_API_KEY's tenant is derived from the key as before, so what it stored stays reachable after an upgrade."""
    legacy = client(tenants_stack, LEGACY_KEY)
    encode(legacy, image(821, uuid="legacy-1"))
    tenant = single_key_tenant(LEGACY_KEY)
    assert any(f"{{u:{tenant}:legacy-1}}" in k for k in redis_keys(tenants_stack.redis_url))
    status, _ = failure(lambda: client(tenants_stack, KEYS["alice"]).get("/mm/embeddings/legacy-1", cast_to=object))
    assert status == 404


def test_a_bad_keys_file_stops_the_gateway(tmp_path: Path) -> None:
    from gateway.app import create_app
    from mmserve.config import Settings

    bad = tmp_path / "keys"
    cases = (("# ok\nsk-SECRET\n", "entry 2"), ("a:sk-SECRET\nb:sk-SECRET\n", "two tenants"), ("bad name:sk-SECRET\n", "tenant name"))
    for text, expected in cases:
        bad.write_text(text)
        with pytest.raises(ValueError, match=expected) as err:
            create_app(Settings(api_keys_file=bad))
        assert "SECRET" not in str(err.value)  # never echoes a key


def test_the_prefix_cache_is_not_shared_across_tenants(alice: openai.OpenAI, bob: openai.OpenAI) -> None:
    """Bob's prompt reuses no KV of alice's: `cached_tokens` would tell him she just sent the same text."""
    words = " ".join(f"word{i}" for i in range(80))

    def cached(who: openai.OpenAI) -> int:
        reply = who.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": words}], max_completion_tokens=2, temperature=0
        )
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        return reply.usage.prompt_tokens_details.cached_tokens or 0

    first, again = cached(alice), cached(alice)
    assert again > first  # the cache works within a tenant (first may hit the chat template's start, from her earlier chats)
    assert cached(bob) < again  # with a shared cache bob would hit every block alice just filled
    assert cached(bob) == again  # his own second try does
