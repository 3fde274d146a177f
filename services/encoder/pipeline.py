"""From MediaInput items to stored embeddings: the encoder's whole job, in steps.

1. validate every item (modality, options, uuid, per-request limits);
2. look up pure references (never fetched, never encoded);
3. acquire every item's bytes concurrently (guarded fetcher, data URLs, ...);
4. derive each item's identity (content sha256 + model fingerprint + dtype +
   effective options) and look it up: same identity already stored means no
   decode and no model run (`cached`);
5. decode and preprocess the rest off the event loop, run the towers through
   the batcher, and store the results.

All-or-nothing: any failure before the writes stores nothing; a failure while
writing removes what this call had already written, so a failed request
leaves the store as it found it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.config import Settings
from mmserve.decoded import MediaOptions
from mmserve.errors import Internal, InvalidArgument, MmserveError, NotFound, Reason
from mmserve.mediainput import is_reference, reference_of, source_kind
from mmserve.metrics import CACHE_HITS, CACHE_MISSES, FETCH_SECONDS, LEASE_WAITS, STORE_BYTES
from mmserve.modality import BY_PROTO, Modality, ModalityValue, check_item_limits
from mmserve.models.families import EncodedItem, PreparedItem
from mmserve.models.loading import LoadedModel
from mmserve.store import EmbeddingStore, RawTensor, StoredEmbedding, canonical_options_json, content_id, validate_uuid
from mmserve.store.identity import Identity, check_usable, check_uuid_binding
from services.encoder.batcher import Batcher
from services.encoder.media.acquire import Acquired, acquire
from services.encoder.media.budget import RequestBudget
from services.encoder.media.decode import decode_media, media_options
from services.encoder.media.embeds import check_size, client_embedding
from services.encoder.media.fetch import GuardedFetcher

log = logging.getLogger("mmserve.encoder")


@dataclass
class _Job:
    index: int
    field: str
    item: media_pb2.MediaInput
    acquired: Acquired | None = None
    content_sha256: str = ""
    options: MediaOptions = dataclasses.field(default_factory=lambda: MediaOptions())  # `field` is a field's name here
    options_json: str = ""
    content_id: str = ""
    result: pb.EncodeResult | None = None
    tensors: list[RawTensor] | None = None
    encoded: EncodedItem | None = None

    @property
    def modality(self) -> ModalityValue:
        return self.item.modality

    @property
    def kind(self) -> Modality:
        """The item's modality (validated on entry)."""
        return BY_PROTO[self.item.modality]

    @property
    def key(self) -> str:
        """The id the embedding is stored under: the client uuid, else the content id."""
        return self.item.uuid or self.content_id


class EncoderPipeline:
    """Encodes batches of MediaInput for one loaded model."""

    def __init__(
        self, settings: Settings, model: LoadedModel, store: EmbeddingStore, fetcher: GuardedFetcher, tower: ThreadPoolExecutor
    ) -> None:
        """`tower`: the process's model thread (`mmserve.models.threads.model_executor`), which runs every tower call."""
        self.settings = settings
        self.model = model
        self.family = model.family
        self.store = store
        self.fetcher = fetcher
        self.batcher = Batcher(
            self.family.encode, max_batch=settings.encoder_max_batch, wait_s=settings.encoder_batch_wait_ms / 1000, executor=tower
        )

    async def close(self) -> None:
        await self.batcher.close()

    # --- validation --------------------------------------------------------------
    def validate(self, jobs: list[_Job], *, count_field: str) -> None:
        """Check every item before any work; errors name the offending field."""
        for job in jobs:
            item = job.item
            if item.modality not in BY_PROTO:
                raise InvalidArgument("modality must be set (image, video, audio or time_series)", field=f"{job.field}.modality")
            self.family.check_modality(item.modality, f"{job.field}.modality")
            opts = item.WhichOneof("options")
            if opts is not None and opts != job.kind.field:
                raise InvalidArgument(f"{opts} options given for a {job.kind.name} item", field=f"{job.field}.{opts}")
            if item.uuid:
                validate_uuid(item.uuid, f"{job.field}.uuid")
            if not is_reference(item) and not item.HasField("source"):
                raise InvalidArgument("source is required (or a uuid to refer to a stored embedding)", field=f"{job.field}.source")
            if source_kind(item) == "embeds" and opts is not None:
                raise InvalidArgument("processing options do not apply to a client embedding", field=f"{job.field}.{opts}")
        check_item_limits((job.modality for job in jobs), self.settings, count_field)

    # --- the flow -------------------------------------------------------------------
    async def encode(
        self,
        items: list[media_pb2.MediaInput],
        *,
        tenant: str,
        prefix: str = "items",
        preloaded: dict[int, bytes] | None = None,
        timeout: float | None = None,
    ) -> list[pb.EncodeResult]:
        """Encode (or find) every item; results in request order (`timeout`: the request's remaining deadline)."""
        jobs = [_Job(i, f"{prefix}[{i}]", item) for i, item in enumerate(items)]
        self.validate(jobs, count_field=prefix)
        refs = [j for j in jobs if is_reference(j.item)]
        fresh = [j for j in jobs if not is_reference(j.item)]
        await self._resolve_references(refs, tenant)
        budget = RequestBudget.from_settings(self.settings)
        await _gather_in_order(self._acquire(j, budget, (preloaded or {}).get(j.index)) for j in fresh)
        for job in fresh:
            self._identify(job)
        todo = await self._lookup(fresh, tenant)
        async with self._leases(todo, tenant, timeout):
            await self._run_towers(todo, budget)
            await self._store(todo, tenant)
        return [job.result for job in jobs if job.result is not None]

    async def _resolve_references(self, jobs: list[_Job], tenant: str) -> None:
        if not jobs:
            return
        found = await self.store.get_many([reference_of(j.item) for j in jobs], tenant=tenant, with_tensors=False)
        missing = [j for j in jobs if found.get(reference_of(j.item)) is None]
        if missing:
            ids = [reference_of(j.item) for j in missing]
            raise NotFound(
                f"no stored embedding for: {', '.join(ids)}",
                field=missing[0].field,
                reason=Reason.EMBEDDING_NOT_FOUND,
                metadata={"missing": ",".join(ids)},
            )
        for job in jobs:
            desc = found[reference_of(job.item)].descriptor  # type: ignore[union-attr]
            self._check_stored(desc, job)
            job.result = pb.EncodeResult(embedding=desc, cached=True)
            CACHE_HITS.labels(job.kind.name).inc()

    def _check_stored(self, desc: embedding_pb2.EmbeddingDescriptor, job: _Job) -> None:
        check_usable(desc, modality=job.modality, fingerprint=self.model.fingerprint, field=job.field)

    async def _acquire(self, job: _Job, budget: RequestBudget, preloaded: bytes | None) -> None:
        if source_kind(job.item) == "embeds" and preloaded is None:
            return await self._take_embedding(job, budget)
        start = time.perf_counter()
        try:
            job.acquired = await acquire(
                job.item,
                modality=job.kind.name,
                settings=self.settings,
                budget=budget,
                fetcher=self.fetcher,
                preloaded=preloaded,
            )
        except MmserveError as err:
            raise err.at(job.field) from None
        FETCH_SECONDS.labels(job.kind.name).observe(time.perf_counter() - start)
        job.content_sha256 = job.acquired.sha256

    async def _take_embedding(self, job: _Job, budget: RequestBudget) -> None:
        """A client-supplied embedding: checked against the model (off the event loop) and ready to store, no tower."""
        embeds = job.item.source.embeds
        try:
            check_size(embeds, self.settings, budget)
            job.encoded, job.content_sha256 = await asyncio.to_thread(client_embedding, self.family, job.modality, embeds, job.kind.name)
        except MmserveError as err:
            raise err.at(job.field) from None

    def _identify(self, job: _Job) -> None:
        try:
            if job.encoded is not None:  # a client embedding: kept apart from anything encoded here
                job.options = {"client_embeddings": True}
            else:
                job.options = {**media_options(job.item, self.settings), **self.family.effective_options(job.item)}
        except MmserveError as err:
            raise err.at(job.field) from None
        job.options_json = canonical_options_json(job.options)
        job.content_id = content_id(
            modality=job.modality,
            content_sha256=job.content_sha256,
            model_fingerprint=self.model.fingerprint,
            dtype=self.model.proto_dtype,
            options_json=job.options_json,
        )

    def _identity(self, job: _Job) -> Identity:
        return Identity(job.modality, job.content_sha256, self.model.fingerprint, job.options_json)

    async def _lookup(self, jobs: list[_Job], tenant: str) -> list[_Job]:
        """Mark jobs whose identity is stored as cached; return those that need the model."""
        if not jobs:
            return []
        keys = sorted({j.key for j in jobs} | {j.content_id for j in jobs if j.item.uuid})
        found = await self.store.get_many(keys, tenant=tenant, with_tensors=False, touch=True)  # a re-encode slides the expiry
        todo: list[_Job] = []
        for job in jobs:
            stored = found.get(job.key)
            if stored is not None:
                desc = stored.descriptor
                if job.item.uuid:
                    check_uuid_binding(job.item.uuid, stored=Identity.of(desc), wanted=self._identity(job), field=f"{job.field}.uuid")
                job.result = pb.EncodeResult(embedding=desc, cached=True)
                CACHE_HITS.labels(job.kind.name).inc()
                continue
            if job.item.uuid and found.get(job.content_id) is not None:
                # Same content already encoded without this uuid: copy it, no model run.
                full = await self.store.get(job.content_id, tenant=tenant, with_tensors=True)
                if full is not None:
                    job.tensors = full.tensors
                    job.encoded = EncodedItem(full.tensors, int(full.descriptor.token_count), _placement_of(full.descriptor))
                    CACHE_HITS.labels(job.kind.name).inc()
                    todo.append(job)
                    continue
            CACHE_MISSES.labels(job.kind.name).inc()
            todo.append(job)
        return todo

    # --- one model run per content across replicas ----------------------------------
    @contextlib.asynccontextmanager
    async def _leases(self, jobs: list[_Job], tenant: str, timeout: float | None) -> Any:
        """Hold the encode lease of every content this call must run the model for, until it is stored or failed.

        The lease is `SET NX PX` on the content id's key (same hash tag as the
        record). Content whose lease another encoder holds is not encoded here:
        this call polls for that encoder's record (small backoff, bounded by the
        request deadline) and uses it, as if it had been stored before. A lease
        freed without a record (its holder failed or died: the PX expires it)
        is taken over. Held leases are renewed while the model runs and
        released by compare-and-delete at the end.
        """
        first_of: dict[str, _Job] = {}
        for job in jobs:
            if job.encoded is None:
                first_of.setdefault(job.content_id, job)
        held: dict[str, str] = {}
        renewer: asyncio.Task[None] | None = None
        try:
            if first_of:
                loop = asyncio.get_running_loop()
                wait_s = timeout if timeout is not None else 10 * self.settings.encode_lease_ms / 1000
                deadline = loop.time() + max(wait_s, 0.0)
                found = await asyncio.gather(*(self._take_or_wait(cid, tenant, held, deadline) for cid in first_of))
                for cid, stored in zip(first_of, found, strict=True):
                    if stored is None:
                        continue
                    desc = stored.descriptor
                    encoded = EncodedItem(stored.tensors, int(desc.token_count), _placement_of(desc))
                    for job in jobs:
                        if job.encoded is None and job.content_id == cid:
                            job.encoded, job.tensors = encoded, stored.tensors
                            LEASE_WAITS.labels(job.kind.name).inc()
            if held:
                renewer = asyncio.create_task(self._renew(held, tenant))
            yield
        finally:
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError, MmserveError):
                    await renewer
            for cid, token in held.items():
                try:
                    await self.store.release_lease(cid, tenant=tenant, token=token)
                except MmserveError:
                    log.warning("could not release the encode lease of %s (it expires by itself)", cid)

    async def _take_or_wait(self, cid: str, tenant: str, held: dict[str, str], deadline: float) -> StoredEmbedding | None:
        """None once this call holds `cid`'s lease (or waited to its deadline): run the model; else the record another encoder stored."""
        loop = asyncio.get_running_loop()
        ttl_ms = self.settings.encode_lease_ms
        delay = 0.01
        while True:
            token = secrets.token_hex(16)
            if await self.store.take_lease(cid, tenant=tenant, token=token, ttl_ms=ttl_ms):
                # The previous holder may have stored and released between our lookup and this take.
                stored = await self.store.get(cid, tenant=tenant, with_tensors=True)
                if stored is not None:
                    await self.store.release_lease(cid, tenant=tenant, token=token)
                    return stored
                held[cid] = token
                return None
            if await self.store.exists(cid, tenant=tenant):
                stored = await self.store.get(cid, tenant=tenant, with_tensors=True)
                if stored is not None:
                    return stored
            if loop.time() + delay > deadline:
                log.warning("gave up waiting for another encoder's result for %s: encoding it here", cid)
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    async def _renew(self, held: dict[str, str], tenant: str) -> None:
        """Keep the held leases alive while the model runs (every third of their lifetime)."""
        ttl_ms = self.settings.encode_lease_ms
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            for cid, token in list(held.items()):
                try:
                    if not await self.store.renew_lease(cid, tenant=tenant, token=token, ttl_ms=ttl_ms):
                        log.warning("lost the encode lease of %s (expired): another encoder may run it too", cid)
                except MmserveError as exc:
                    log.warning("could not renew the encode lease of %s: %s", cid, exc)

    async def _run_towers(self, jobs: list[_Job], budget: RequestBudget) -> None:
        """Decode + preprocess in worker threads, then encode through the batcher (same content once)."""
        need = [j for j in jobs if j.encoded is None]
        first_of: dict[str, _Job] = {}
        for job in need:
            first_of.setdefault(job.content_id, job)
        unique = list(first_of.values())

        async def prepare(job: _Job) -> PreparedItem:
            try:
                return await asyncio.to_thread(self._decode_and_prepare, job, budget)
            except MmserveError as err:
                raise err.at(job.field) from None

        prepared = await _gather_in_order(prepare(j) for j in unique)
        encoded = await asyncio.gather(*(self.batcher.submit(j.modality, p) for j, p in zip(unique, prepared, strict=True)))
        by_content = {j.content_id: e for j, e in zip(unique, encoded, strict=True)}
        for job in need:
            job.encoded = by_content[job.content_id]

    def _decode_and_prepare(self, job: _Job, budget: RequestBudget) -> PreparedItem:
        """Decode, then preprocess, in one worker-thread hop (both CPU-bound; a second hop only added latency)."""
        assert job.acquired is not None
        media = decode_media(job.modality, job.acquired, job.options, self.settings, budget)
        return self.family.prepare(job.modality, media, job.options)

    async def _store(self, jobs: list[_Job], tenant: str) -> None:
        written: list[str] = []
        try:
            for job in jobs:
                assert job.encoded is not None
                desc = self._descriptor(job, job.encoded)
                put = await self.store.put(desc, job.encoded.tensors, tenant=tenant)
                if put.created:
                    written.append(job.key)
                    STORE_BYTES.inc(put.descriptor.nbytes)
                job.result = pb.EncodeResult(embedding=put.descriptor, cached=job.tensors is not None or not put.created)
        except BaseException:
            await self._rollback(written, tenant)
            raise

    async def _rollback(self, keys: list[str], tenant: str) -> None:
        for key in keys:
            try:
                await self.store.delete(key, tenant=tenant)
            except MmserveError:
                log.warning("could not roll back embedding %s after a failed request", key)

    def _descriptor(self, job: _Job, encoded: EncodedItem) -> embedding_pb2.EmbeddingDescriptor:
        desc = embedding_pb2.EmbeddingDescriptor(
            id=job.key,
            modality=job.modality,
            model=self.model.served_name,
            model_fingerprint=self.model.fingerprint,
            token_count=encoded.token_count,
            content_sha256=job.content_sha256,
            client_uuid=bool(job.item.uuid),
            options_json=job.options_json,
        )
        getattr(desc, job.kind.field).CopyFrom(encoded.placement)
        family = self.family.family_placement(job.modality, encoded.placement)
        if family is not None:
            desc.family_placement.Pack(family)
        return desc


def _placement_of(desc: embedding_pb2.EmbeddingDescriptor) -> Message:
    """A stored record's shared placement (every put fills one, and the record's seal covers it)."""
    name = desc.WhichOneof("placement")
    if name is None:
        raise Internal(f"stored embedding {desc.id} has no placement")
    placement: Message = getattr(desc, name)
    return placement


async def _gather_in_order(coros: Any) -> list[Any]:
    """Run concurrently; on failure cancel the rest and raise the lowest-index error (deterministic)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return []
    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise failed[0].exception()
    return [t.result() for t in tasks]
