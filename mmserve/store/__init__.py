"""The embedding store: embeddings in Redis under stable ids, shared by encoders and decoders.

Import-light on purpose (redis and protobuf only, no torch, no numpy): tensors
are raw bytes here, and turning them into arrays is the model code's job.
"""

from mmserve.store.identity import (
    CONTENT_ID_PREFIX,
    Identity,
    canonical_options_json,
    content_id,
    is_content_id,
)
from mmserve.store.keys import (
    DEFAULT_KEY_PREFIX,
    EmbeddingKeys,
    embedding_keys,
    validate_tenant,
    validate_uuid,
)
from mmserve.store.redis_store import EmbeddingStore, PutResult, StoredEmbedding
from mmserve.store.tensors import DTYPES, RawTensor, dtype_name, itemsize, tensor_nbytes

__all__ = [
    "CONTENT_ID_PREFIX",
    "DEFAULT_KEY_PREFIX",
    "DTYPES",
    "EmbeddingKeys",
    "EmbeddingStore",
    "Identity",
    "PutResult",
    "RawTensor",
    "StoredEmbedding",
    "canonical_options_json",
    "content_id",
    "dtype_name",
    "embedding_keys",
    "is_content_id",
    "itemsize",
    "tensor_nbytes",
    "validate_tenant",
    "validate_uuid",
]
