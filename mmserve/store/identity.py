"""What makes two embeddings the same one (docs/inputs.md section 5), and the content id derived from it.

An embedding is determined by the source bytes, the encoder (weights, revision
and dtype, summed up in the model fingerprint), the output dtype, the modality
and the effective processing options. Hashing exactly those, in an encoding
where no two different tuples can produce the same bytes, gives an id that any
encoder replica computes alike: the same request never runs a tower twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.errors import Conflict, FailedPrecondition, InvalidArgument, Reason
from mmserve.mediainput import CONTENT_ID_PREFIX
from mmserve.modality import name_of
from mmserve.store.tensors import dtype_info

CONTENT_ID_RE = re.compile(r"mmemb-[0-9a-f]{64}")
SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")

# Bumped if the encoding below ever changes, so old and new ids cannot collide.
_ID_DOMAIN = "mmserve.content_id.v1"


def is_content_id(ref: str) -> bool:
    """True iff `ref` has the exact form of a content id; anything else is a client uuid."""
    return CONTENT_ID_RE.fullmatch(ref) is not None


def _normalise(value: Any, path: str) -> Any:
    """JSON-ready value with one spelling per meaning (2.0 and 2 are the same option)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise InvalidArgument(f"option {path} must be a finite number", field=path)
        return int(number) if number.is_integer() else number
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(f"option keys must be strings, got {type(key).__name__} in {path}", field=path)
            out[key] = _normalise(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_normalise(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise InvalidArgument(f"option {path} has unsupported type {type(value).__name__}", field=path)


def canonical_options_json(options: Mapping[str, Any] | None) -> str:
    """The one JSON text for a set of options: sorted keys, no spaces, ASCII, integral floats as ints."""
    normalised = _normalise(dict(options or {}), "options")
    return json.dumps(normalised, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonicalise_options_text(options_json: str) -> str:
    """Re-canonicalise an options JSON text ("" means no options), so spelling never changes identity."""
    if not options_json:
        return "{}"
    try:
        parsed = json.loads(options_json)
    except ValueError as exc:
        raise InvalidArgument("options_json is not valid JSON", field="options_json") from exc
    if not isinstance(parsed, dict):
        raise InvalidArgument("options_json must be a JSON object", field="options_json")
    return canonical_options_json(parsed)


@dataclass(frozen=True)
class Identity:
    """The fields that decide whether two stored embeddings are the same one."""

    modality: int
    content_sha256: str
    model_fingerprint: str
    options_json: str

    @classmethod
    def of(cls, descriptor: embedding_pb2.EmbeddingDescriptor) -> Identity:
        """Identity of a descriptor, validated and with canonical options."""
        return cls.checked(
            modality=descriptor.modality,
            content_sha256=descriptor.content_sha256,
            model_fingerprint=descriptor.model_fingerprint,
            options_json=descriptor.options_json,
        )

    @classmethod
    def checked(cls, *, modality: int, content_sha256: str, model_fingerprint: str, options_json: str) -> Identity:
        """Build an identity, refusing inputs that would make ids ambiguous or meaningless."""
        if modality not in media_pb2.Modality.values() or modality == media_pb2.MODALITY_UNSPECIFIED:
            raise InvalidArgument(f"modality must be set to a known value, got {modality}", field="modality")
        if SHA256_HEX_RE.fullmatch(content_sha256) is None:
            raise InvalidArgument("content_sha256 must be 64 lowercase hex digits", field="content_sha256")
        if not model_fingerprint:
            raise InvalidArgument("model_fingerprint must be set", field="model_fingerprint")
        return cls(modality, content_sha256, model_fingerprint, canonicalise_options_text(options_json))

    def differences(self, other: Identity) -> list[str]:
        """Human-readable list of what differs, for conflict messages."""
        out = []
        if self.content_sha256 != other.content_sha256:
            out.append("other content")
        if self.model_fingerprint != other.model_fingerprint:
            out.append("another model")
        if self.modality != other.modality:
            out.append("another modality")
        if self.options_json != other.options_json:
            out.append("other processing options")
        return out


def check_uuid_binding(uuid: str, *, stored: Identity, wanted: Identity, field: str) -> None:
    """A client uuid names one embedding for good: binding it to another identity is a 409 (never a silent new version)."""
    differences = wanted.differences(stored)
    if differences:
        raise Conflict(
            f"uuid {uuid!r} is already bound to {' and '.join(differences)}; use a new uuid, or delete the old embedding first",
            field=field, metadata={"uuid": uuid},
        )  # fmt: skip


def check_usable(descriptor: embedding_pb2.EmbeddingDescriptor, *, modality: int, fingerprint: str, field: str) -> None:
    """A stored embedding may stand for a part only if it is of the part's modality and this server's model made it."""
    if descriptor.modality != modality:
        raise InvalidArgument(
            f"embedding {descriptor.id} is {name_of(descriptor.modality)}, not {name_of(modality)}",
            field=f"{field}.modality", reason=Reason.MODALITY_MISMATCH,
        )  # fmt: skip
    if descriptor.model_fingerprint != fingerprint:
        raise FailedPrecondition(
            f"embedding {descriptor.id} was made by another model ({descriptor.model_fingerprint}); this server serves {fingerprint}",
            field=field, reason=Reason.MODEL_MISMATCH,
        )  # fmt: skip


def content_id(*, modality: int, content_sha256: str, model_fingerprint: str, dtype: int, options_json: str) -> str:
    """The content-derived id "mmemb-<sha256 hex>" of an embedding.

    The hashed bytes are a JSON array (ASCII, fixed order, domain tag first):
    JSON quoting makes the field boundaries unambiguous, unlike a plain join.
    """
    ident = Identity.checked(
        modality=modality,
        content_sha256=content_sha256,
        model_fingerprint=model_fingerprint,
        options_json=options_json,
    )
    dtype_info(dtype)
    encoded = json.dumps(
        [_ID_DOMAIN, ident.modality, ident.content_sha256, ident.model_fingerprint, int(dtype), ident.options_json],
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    return CONTENT_ID_PREFIX + hashlib.sha256(encoded).hexdigest()
