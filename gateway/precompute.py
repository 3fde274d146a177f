"""Precompute over REST: POST /v1/mm/encode, GET and DELETE /v1/mm/embeddings/{id}.

The REST face of EncoderService: embed media now, refer to it later from any
chat request (a media part with a null payload and `uuid` = the returned id)
with no refetch and no re-encode.
"""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import APIRouter, Depends, Path, Request

from gateway.embeds import content_part_type, json_field
from gateway.errors import error_responses
from gateway.schemas import DeletedEmbedding, EmbeddingObject, EncodeRequest, EncodeResponse
from gateway.state import Gateway, call_metadata, gateway, tenant
from gateway.translate import to_encode_items
from mmserve.api.common.v1 import embedding_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from mmserve.errors import MmserveError, from_rpc_error
from mmserve.modality import name_of

router = APIRouter(tags=["precompute"])


def _object(desc: embedding_pb2.EmbeddingDescriptor, cached: bool | None = None) -> EmbeddingObject:
    return EmbeddingObject(
        id=desc.id,
        modality=name_of(desc.modality),
        tokens=desc.token_count,
        model=desc.model,
        cached=cached,
        created_at=desc.created_at.seconds,
        content_sha256=desc.content_sha256,
        expires_at=desc.expires_at.seconds if desc.HasField("expires_at") else None,
    )


def _rest_error(exc: grpc.RpcError, content: list[Any] | None = None) -> MmserveError:
    """The encoder's error with its `items[i]` field renamed to this API's `content[i]` (client embeddings: JSON names)."""
    err = from_rpc_error(exc, peer="encoder")
    if err.field and err.field.startswith("items"):
        err.field = "content" + err.field[len("items") :]
        if content is not None:
            err.field = json_field(err.field, content_part_type(content))
    return err


@router.post("/v1/mm/encode", response_model=EncodeResponse, responses=error_responses(400, 401, 409, 413, 422, 429, 503, 504))
async def encode(body: EncodeRequest, request: Request, gw: Gateway = Depends(gateway), caller: str = Depends(tenant)) -> EncodeResponse:
    """Embed and store media parts; returns their ids, token counts and expiry, in request order."""
    items = to_encode_items(body)
    try:
        reply = await gw.encoder.Encode(
            enc_pb.EncodeRequest(items=items), metadata=call_metadata(request, caller), timeout=gw.settings.gateway_request_timeout_s
        )
    except grpc.RpcError as exc:
        raise _rest_error(exc, body.content) from None
    return EncodeResponse(data=[_object(r.embedding, r.cached) for r in reply.results])


@router.get("/v1/mm/embeddings/{embedding_id}", response_model=EmbeddingObject, responses=error_responses(401, 404, 503, 504))
async def get_embedding(
    request: Request,
    embedding_id: str = Path(..., description="A client uuid or a content id."),
    gw: Gateway = Depends(gateway),
    caller: str = Depends(tenant),
) -> EmbeddingObject:
    """Describe a stored embedding (404 if it is not stored or has expired)."""
    try:
        reply = await gw.encoder.GetEmbedding(
            enc_pb.GetEmbeddingRequest(id=embedding_id), metadata=call_metadata(request, caller), timeout=30
        )
    except grpc.RpcError as exc:
        raise _rest_error(exc) from None
    return _object(reply.embedding)


@router.delete("/v1/mm/embeddings/{embedding_id}", response_model=DeletedEmbedding, responses=error_responses(401, 503, 504))
async def delete_embedding(
    request: Request,
    embedding_id: str = Path(..., description="A client uuid or a content id."),
    gw: Gateway = Depends(gateway),
    caller: str = Depends(tenant),
) -> DeletedEmbedding:
    """Delete a stored embedding; `deleted` is false if there was none."""
    try:
        reply = await gw.encoder.DeleteEmbedding(
            enc_pb.DeleteEmbeddingRequest(id=embedding_id), metadata=call_metadata(request, caller), timeout=30
        )
    except grpc.RpcError as exc:
        raise _rest_error(exc) from None
    return DeletedEmbedding(id=embedding_id, deleted=reply.deleted)
