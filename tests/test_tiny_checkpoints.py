"""The tiny-checkpoint generator: deterministic, cached, lock-safe, and loadable like a hub checkpoint.

Only the tiny checkpoint is built here; the mid one is for benchmarks.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
)

from mmserve.models.tiny import CHECKPOINTS, MARKER, ensure_checkpoint, generator_digest, main, read_marker
from mmserve.models.tiny import cache as tiny_cache

TINY = "qwen2_5_vl-tiny"
# Every file whose bytes a loader reads; the marker is checked separately.
CHECKPOINT_FILES = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "chat_template.jinja",
}
EXPECTED_IDS = {
    "<|endoftext|>": 0,
    "<|im_start|>": 1,
    "<|im_end|>": 2,
    "<|vision_start|>": 3,
    "<|vision_end|>": 4,
    "<|image_pad|>": 5,
    "<|video_pad|>": 6,
}


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_checkpoint(TINY, tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="module")
def processor(tiny_dir: Path) -> Qwen2_5_VLProcessor:
    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).eval()


def test_registry_lists_both_qwen2_5_vl_sizes() -> None:
    assert {"qwen2_5_vl-tiny", "qwen2_5_vl-mid"} <= set(CHECKPOINTS)
    assert {spec.family for spec in CHECKPOINTS.values()} == {"qwen2_5_vl"}
    with pytest.raises(ValueError, match="known: .*qwen2_5_vl-tiny"):
        ensure_checkpoint("no-such-model")


def test_folder_layout_and_marker(tiny_dir: Path) -> None:
    assert tiny_dir.name == f"{TINY}-{generator_digest()}"
    assert tiny_dir.parent.name == "checkpoints"
    assert CHECKPOINT_FILES | {MARKER} == {p.name for p in tiny_dir.iterdir()}
    assert read_marker(tiny_dir) == {
        "name": TINY,
        "family": "qwen2_5_vl",
        "random_weights": True,
        "generator_digest": generator_digest(),
    }
    # No temp folders left beside it.
    assert [p.name for p in tiny_dir.parent.iterdir() if ".tmp-" in p.name] == []


def test_builds_are_byte_identical(tiny_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(987654)  # whatever the caller's RNG state, the build seeds itself
    again = ensure_checkpoint(TINY, tmp_path)
    assert again != tiny_dir
    first, second = file_hashes(tiny_dir), file_hashes(again)
    assert CHECKPOINT_FILES <= set(first)
    assert first == second


def test_cache_is_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=tiny_cache.__name__)
    path = ensure_checkpoint(TINY, tmp_path)
    assert sum("building tiny checkpoint" in r.getMessage() for r in caplog.records) == 1
    weights_mtime = (path / "model.safetensors").stat().st_mtime_ns
    caplog.clear()

    assert ensure_checkpoint(TINY, tmp_path) == path
    assert [r.getMessage() for r in caplog.records if "building" in r.getMessage()] == []
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        @staticmethod
        def build(spec: object, out_dir: Path) -> None:
            (out_dir / "config.json").write_text("{}")
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(tiny_cache, "family_builder", lambda family: Broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ensure_checkpoint(TINY, tmp_path)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_digest_follows_sources_and_library_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = Path(tiny_cache.__file__).parent
    copy = tmp_path / "tiny"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    real = generator_digest()

    def digest_of(sources: Path) -> str:
        monkeypatch.setattr(tiny_cache, "files", lambda _package: sources)
        tiny_cache.generator_digest.cache_clear()
        try:
            return tiny_cache.generator_digest()
        finally:
            tiny_cache.generator_digest.cache_clear()

    assert digest_of(copy) == real  # content-addressed, not path-addressed
    with open(copy / "corpus.txt", "a", encoding="utf-8") as corpus:
        corpus.write("One more line.\n")
    edited = digest_of(copy)
    assert edited != real

    monkeypatch.setattr(tiny_cache, "version", lambda library: "0.0.0")
    assert digest_of(package) not in (real, edited)


def _blocked_on_flock(pids: set[int]) -> set[int]:
    """Pids among `pids` waiting for an flock (Linux /proc/locks marks waiters with '->')."""
    waiting = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK" and int(fields[5]) in pids:
            waiting.add(int(fields[5]))
    return waiting


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks to see lock waiters")
def test_two_processes_build_once(tmp_path: Path, tiny_dir: Path) -> None:
    """Both processes queue on the lock while we hold it; on release exactly one builds."""
    cache_dir = tmp_path / "shared-cache"
    final = tiny_cache.checkpoint_dir(TINY, cache_dir)
    final.parent.mkdir(parents=True)
    command = [sys.executable, "-m", "mmserve.models.tiny", "--name", TINY, "--cache-dir", str(cache_dir)]
    with open(tiny_cache.lock_path(final), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        procs = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
        ]
        deadline = time.monotonic() + 120
        while _blocked_on_flock({p.pid for p in procs}) != {p.pid for p in procs}:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the two builders never queued on the lock"
            time.sleep(0.1)
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [out for out, _ in results] == [f"{TINY}\t{final}\n"] * 2
    assert sum(err.count("building tiny checkpoint") for _, err in results) == 1
    assert [p.name for p in final.parent.iterdir() if ".tmp-" in p.name] == []
    # Built in another interpreter (other hash seed) and still byte-identical.
    assert file_hashes(final) == file_hashes(tiny_dir)


def test_cli_prints_name_and_path(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--name", TINY, "--cache-dir", str(tiny_dir.parent.parent)]) == 0
    assert capsys.readouterr().out == f"{TINY}\t{tiny_dir}\n"


def test_config_round_trip(tiny_dir: Path, model: Qwen2_5_VLForConditionalGeneration) -> None:
    config = AutoConfig.from_pretrained(tiny_dir)
    assert isinstance(config, Qwen2_5_VLConfig)
    assert (config.image_token_id, config.video_token_id) == (5, 6)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (3, 4)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (128, 2, 2048)
    assert (vision.hidden_size, vision.depth, vision.out_hidden_size) == (64, 2, 128)
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert text.initializer_range == vision.initializer_range == 0.3
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)

    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 0.8e6 < model.num_parameters() < 1.5e6
    weight_std = model.lm_head.weight.std().item()
    assert 0.25 < weight_std < 0.35  # initializer_range reached the weights
    assert list(model.generation_config.eos_token_id) == [2, 0]
    assert model.generation_config.pad_token_id == 0


def test_tokenizer(processor: Qwen2_5_VLProcessor) -> None:
    tokenizer = processor.tokenizer
    assert isinstance(tokenizer, Qwen2Tokenizer)
    assert len(tokenizer) == 2048
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in EXPECTED_IDS} == EXPECTED_IDS
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert (processor.image_token_id, processor.video_token_id) == (5, 6)

    text = "Café Zürich, 中文 and 🙂: 42 + 7 = 49!"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges learned, not one token per byte
    # Special tokens are single ids, never split, and dropped on request.
    ids = tokenizer("a<|vision_start|><|image_pad|><|vision_end|>b").input_ids
    assert ids[1:4] == [3, 5, 4]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_chat_template(processor: Qwen2_5_VLProcessor) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                {"type": "video"},
                {"type": "video_url", "video_url": {"url": "http://x/y.mp4"}},
                {"type": "text", "text": "And these?"},
            ],
        },
    ]
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{image}What is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        f"<|im_start|>user\n{image}{video}{video}And these?<|im_end|>\n"
    )
    assert processor.apply_chat_template(messages) == expected
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        expected + "<|im_start|>assistant\n"
    )
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False) == expected

    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _greedy(model: Qwen2_5_VLForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> list[int]:
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=30)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def test_monolithic_generate_with_image_is_not_degenerate(
    processor: Qwen2_5_VLProcessor, model: Qwen2_5_VLForConditionalGeneration
) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[_image(96, 64, seed=1)], return_tensors="pt")
    grid = inputs["image_grid_thw"][0].tolist()
    assert (inputs["input_ids"][0] == 5).sum().item() == grid[0] * grid[1] * grid[2] // 4
    tokens = _greedy(model, inputs)
    assert len(tokens) >= 20 and len(set(tokens)) >= 10, tokens
    # The image matters: another image changes the answer.
    other = processor(text=[prompt], images=[_image(96, 64, seed=2)], return_tensors="pt")
    assert _greedy(model, other) != tokens


def test_monolithic_generate_from_text_is_not_degenerate(
    processor: Qwen2_5_VLProcessor, model: Qwen2_5_VLForConditionalGeneration
) -> None:
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "Tell me about the lighthouse."}], add_generation_prompt=True
    )
    tokens = _greedy(model, processor(text=[prompt], return_tensors="pt"))
    assert len(tokens) >= 20 and len(set(tokens)) >= 10, tokens


def test_image_features_are_per_image_in_llm_space(
    processor: Qwen2_5_VLProcessor, model: Qwen2_5_VLForConditionalGeneration
) -> None:
    images = [_image(96, 64, seed=1), _image(56, 140, seed=3)]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], add_generation_prompt=True
    )
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    grids = inputs["image_grid_thw"]
    with torch.inference_mode():
        features = model.get_image_features(inputs["pixel_values"], grids).pooler_output
    assert isinstance(features, tuple) and len(features) == 2
    assert [tuple(f.shape) for f in features] == [(int(g.prod()) // 4, 128) for g in grids]
    assert features[0].shape != features[1].shape  # the two sizes really differ
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in features)


def test_build_leaves_callers_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    ensure_checkpoint(TINY, tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_cache_dir_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tiny_cache.checkpoint_dir(TINY).parent == tmp_path / ".cache" / "mmserve" / "checkpoints"
    assert not os.path.exists(tmp_path / ".cache")  # asking where does not build
    assert read_marker(tmp_path) is None  # not an mmserve-generated checkpoint
