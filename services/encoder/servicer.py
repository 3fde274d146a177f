"""EncoderService over gRPC: thin adapters from RPCs to the pipeline and the store."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator

import grpc

from mmserve.api.common.v1 import media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.api.encoder.v1 import encoder_service_pb2_grpc as pb_grpc
from mmserve.config import Settings
from mmserve.errors import InvalidArgument, MediaTooLarge, MmserveError, NotFound, Reason, Unavailable
from mmserve.rpc.metadata import tenant_var
from mmserve.store import EmbeddingStore
from services.encoder.pipeline import EncoderPipeline

UPLOAD_SPOOL_BYTES = 8 * 1024 * 1024


class EncoderServicer(pb_grpc.EncoderServiceServicer):
    """Implements mmserve.encoder.v1.EncoderService."""

    def __init__(self, settings: Settings, store: EmbeddingStore) -> None:
        self.settings = settings
        self.store = store
        self._pipeline: EncoderPipeline | None = None

    def attach(self, pipeline: EncoderPipeline) -> None:
        """Start serving encode calls (the server runs, NOT_SERVING, while the model loads)."""
        self._pipeline = pipeline

    @property
    def pipeline(self) -> EncoderPipeline:
        if self._pipeline is None:
            raise Unavailable("the encoder is still loading its model")
        return self._pipeline

    @property
    def _tenant(self) -> str:
        return tenant_var.get() or self.settings.tenant

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        if not request.items:
            raise InvalidArgument("at least one item is required", field="items")
        results = await self.pipeline.encode(list(request.items), tenant=self._tenant, timeout=context.time_remaining())
        return pb.EncodeResponse(results=results)

    async def EncodeUpload(
        self, request_iterator: AsyncIterator[pb.EncodeUploadRequest], context: grpc.aio.ServicerContext
    ) -> pb.EncodeUploadResponse:
        header: pb.UploadHeader | None = None
        limit = self.settings.max_upload_bytes
        received = 0
        with tempfile.SpooledTemporaryFile(max_size=UPLOAD_SPOOL_BYTES) as spool:
            async for message in request_iterator:
                part = message.WhichOneof("part")
                if part == "header":
                    if header is not None:
                        raise InvalidArgument("the header must be sent once, first", field="header")
                    header = message.header
                    if header.total_bytes > limit:
                        raise MediaTooLarge(
                            f"upload of {header.total_bytes} bytes exceeds the limit of {limit}", field="header.total_bytes"
                        )
                    continue
                if header is None:
                    raise InvalidArgument("the first message must be the header", field="header")
                received += len(message.chunk)
                if header.total_bytes and received > header.total_bytes:
                    raise InvalidArgument(f"more than the {header.total_bytes} bytes the header announced", field="header.total_bytes")
                if received > limit:
                    raise MediaTooLarge(f"upload exceeds the limit of {limit} bytes", field="chunk")
                spool.write(message.chunk)
            if header is None:
                raise InvalidArgument("empty upload: no header", field="header")
            if header.total_bytes and header.total_bytes != received:
                raise InvalidArgument(f"received {received} bytes, header announced {header.total_bytes}", field="header.total_bytes")
            item = media_pb2.MediaInput()
            item.CopyFrom(header.item)
            kind = item.source.WhichOneof("kind") if item.HasField("source") else None
            if kind is not None:
                raise InvalidArgument("the uploaded item's source must be unset (its bytes are the chunks)", field="header.item.source")
            item.source.data = b""  # marks the item as carrying bytes; the real bytes are preloaded
            spool.seek(0)
            data = spool.read()
        try:
            results = await self.pipeline.encode(
                [item], tenant=self._tenant, prefix="header.item", preloaded={0: data}, timeout=context.time_remaining()
            )
        except MmserveError as err:
            # The pipeline names items "<prefix>[i]"; an upload has one item, at header.item.
            if err.field and err.field.startswith("header.item[0]"):
                err.field = "header.item" + err.field[len("header.item[0]") :]
            raise
        return pb.EncodeUploadResponse(result=results[0])

    async def GetEmbedding(self, request: pb.GetEmbeddingRequest, context: grpc.aio.ServicerContext) -> pb.GetEmbeddingResponse:
        if not request.id:
            raise InvalidArgument("id is required", field="id")
        stored = await self.store.get(request.id, tenant=self._tenant, with_tensors=request.include_tensors)
        if stored is None:
            raise NotFound(
                f"no stored embedding for: {request.id}", field="id", reason=Reason.EMBEDDING_NOT_FOUND, metadata={"missing": request.id}
            )
        tensors = [t.to_proto() for t in stored.tensors] if request.include_tensors else []
        return pb.GetEmbeddingResponse(embedding=stored.descriptor, tensors=tensors)

    async def DeleteEmbedding(self, request: pb.DeleteEmbeddingRequest, context: grpc.aio.ServicerContext) -> pb.DeleteEmbeddingResponse:
        if not request.id:
            raise InvalidArgument("id is required", field="id")
        return pb.DeleteEmbeddingResponse(deleted=await self.store.delete(request.id, tenant=self._tenant))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        model = self.pipeline.model
        return pb.GetModelInfoResponse(
            model=model.served_name,
            family=model.family.name,
            model_fingerprint=model.fingerprint,
            modalities=sorted(model.family.modalities),
            dtype=model.proto_dtype,
            random_weights=model.source.random_weights,
        )
