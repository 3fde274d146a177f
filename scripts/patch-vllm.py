#!/usr/bin/env python3
"""Fix vLLM's Qwen2.5-Omni thinker for embedding inputs (vllm 0.32): run with the vLLM environment's python.

Its `_process_image_input`/`_process_video_input` return the batch's image or
video embeddings as one [tokens, hidden] tensor, where vLLM expects one tensor
per item ("Expected number of multimodal embeddings to match number of input
items: 1, but got len(mm_embeddings)=15"); the pixel path splits them by
grid, the embedding path forgot to. This splits them the same way. Idempotent;
it fails loudly if the code it fixes is not there and not already fixed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE = "vllm.model_executor.models.qwen2_5_omni_thinker"
MARK = "# mmserve: split embedding inputs per item"


def fix(modality: str) -> tuple[str, str]:
    key, grid = f"{modality}_embeds", f"{modality}_grid_thw"
    old = f'        if {modality}_input["type"] == "{key}":\n            return {modality}_input["{key}"].type(self.visual.dtype)\n'
    new = (
        f'        if {modality}_input["type"] == "{key}":  {MARK}\n'
        f"            merge = self.visual.spatial_merge_size\n"
        f'            sizes = {modality}_input["{grid}"].prod(-1) // merge // merge\n'
        f'            return {modality}_input["{key}"].type(self.visual.dtype).split(sizes.tolist())\n'
    )
    return old, new


def main() -> int:
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        print(f"patch-vllm: {MODULE} not found", file=sys.stderr)
        return 1
    path = Path(spec.origin)
    text = text_in = path.read_text()
    for modality in ("image", "video"):
        old, new = fix(modality)
        if new in text:
            continue
        if old not in text:
            print(f"patch-vllm: {path}: the {modality} embedding path changed; check whether vLLM fixed it", file=sys.stderr)
            return 1
        text = text.replace(old, new)
    if text != text_in:
        path.write_text(text)
    print(f"patch-vllm: {path.name} splits embedding inputs per item")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
