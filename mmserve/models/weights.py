"""Read single tensors of a checkpoint folder without building its model (safetensors' lazy reader)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmserve.errors import FailedPrecondition


def _tensor_files(folder: Path) -> dict[str, Path]:
    """name -> the .safetensors file that holds it (sharded checkpoints through their index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return files


def load_input_embeddings(folder: Path, dtype: torch.dtype) -> torch.nn.Embedding:
    """The language model's token embedding table: `*embed_tokens.weight`, the shortest name outside a talker (Omni)."""
    from safetensors import safe_open

    files = _tensor_files(folder)
    names = sorted((n for n in files if n.endswith("embed_tokens.weight") and not n.startswith("talker.")), key=len)
    if not names:
        raise FailedPrecondition(f"{folder} has no embed_tokens weight (needed to embed prompts for the vllm engine)", field="model")
    with safe_open(str(files[names[0]]), "pt") as handle:
        weight = handle.get_tensor(names[0]).to(dtype)
    return torch.nn.Embedding.from_pretrained(weight, freeze=True)
