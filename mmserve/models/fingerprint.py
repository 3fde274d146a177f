"""The model fingerprint: which weights, in which dtype, made an embedding.

Written into every stored embedding and checked by every decoder, so an
embedding made by another model (or another revision or dtype of it) is never
spliced into a prompt. Computed from the config and the weight files
themselves: small files are hashed whole; for large ones the safetensors
header (names, shapes, offsets) plus evenly spaced samples of the data are
hashed, which tells real checkpoints apart in well under a second without
reading gigabytes at start-up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WHOLE_FILE_LIMIT = 64 * 1024 * 1024
SAMPLE_BYTES = 1024 * 1024
SAMPLES = 16


def _hash_weights(path: Path, digest: hashlib._Hash) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}\n".encode())
    with path.open("rb") as fh:
        if size <= WHOLE_FILE_LIMIT:
            digest.update(fh.read())
            return
        header_len = int.from_bytes(fh.read(8), "little") if path.suffix == ".safetensors" else 0
        digest.update(fh.read(min(header_len, size - 8)))
        for i in range(SAMPLES):
            fh.seek(i * max(0, size - SAMPLE_BYTES) // (SAMPLES - 1))
            digest.update(fh.read(SAMPLE_BYTES))


def model_fingerprint(folder: Path, *, family: str, dtype: str, revision: str | None) -> str:
    """`<family>-<32 hex>` over config, weights, revision and dtype."""
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    digest.update(f"\nrevision={revision}\ndtype={dtype}\n".encode())
    for weights in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        _hash_weights(weights, digest)
    adapter = folder / "time_series"  # an attached adapter makes time-series embeddings: it is part of the model
    if (adapter / "config.json").exists():
        digest.update(b"\ntime_series:" + (adapter / "config.json").read_bytes())
        for weights in sorted(adapter.glob("*.safetensors")):
            _hash_weights(weights, digest)
    return f"{family}-{digest.hexdigest()[:32]}"
