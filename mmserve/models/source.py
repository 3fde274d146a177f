"""Turn what the user asked for (`tiny`, a hub id, a local folder) into a local folder.

Everything downstream loads with `from_pretrained(<folder>)`, exactly like a
real checkpoint. Hub ids go through `huggingface_hub.snapshot_download`, which
honours HF_HUB_OFFLINE (then only the local cache is used) and tells us the
commit the snapshot came from, part of the model's fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mmserve.errors import FailedPrecondition

#: What `--model tiny` serves: the built-in random-weight demo checkpoint.
DEFAULT_TINY = "qwen2_5_omni-tiny"
MARKER_FILE = "mmserve_checkpoint.json"


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder."""

    requested: str  # what the user gave
    path: Path  # local folder with config.json
    revision: str | None  # hub commit, when known
    random_weights: bool  # built-in tiny checkpoint: output is noise


def resolve_model(model: str, *, revision: str | None, cache_dir: Path) -> ModelSource:
    """Resolve `tiny`, `tiny:<name>`, a local folder or a hub id to a folder on disk."""
    if model == "tiny" or model.startswith("tiny:"):
        from mmserve.models.tiny import ensure_checkpoint

        name = model.partition(":")[2] or DEFAULT_TINY
        path = ensure_checkpoint(name, cache_dir)
        return ModelSource(model, path, None, True)
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise FailedPrecondition(f"model folder has no config.json: {model}", field="model")
        return ModelSource(model, local.resolve(), revision, _is_random(local))
    return _from_hub(model, revision)


def _is_random(folder: Path) -> bool:
    marker = folder / MARKER_FILE
    if not marker.exists():
        return False
    return bool(json.loads(marker.read_text()).get("random_weights", False))


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"],
            )
        )
    except LocalEntryNotFoundError as exc:
        raise FailedPrecondition(
            f"model {repo_id!r} is not in the local cache and the hub is unreachable or HF_HUB_OFFLINE is set",
            field="model",
        ) from exc
    except (HfHubHTTPError, ValueError, OSError) as exc:
        raise FailedPrecondition(f"cannot get model {repo_id!r} from the hub: {exc}", field="model") from exc
    # A snapshot folder is named after the commit it holds.
    commit = folder.name if folder.parent.name == "snapshots" else revision
    return ModelSource(repo_id, folder, commit, _is_random(folder))
