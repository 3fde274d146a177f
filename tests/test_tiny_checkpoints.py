"""The tiny-checkpoint generator: deterministic, cached, lock-safe, and loadable like a hub checkpoint.

Every family's tiny checkpoint is built here (a few seconds each); the mid
ones are for benchmarks and never built in tests.
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
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2_5OmniConfig,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    WhisperFeatureExtractor,
)

from mmserve.models.time_series_adapter import TimeSeriesAdapter, TimeSeriesAdapterConfig
from mmserve.models.tiny import CHECKPOINTS, MARKER, ensure_checkpoint, generator_digest, main, read_marker
from mmserve.models.tiny import cache as tiny_cache
from mmserve.models.tiny.registry import FAMILY_MODULES

TINY = "qwen2_5_vl-tiny"
QWEN3_VL = "qwen3_vl-tiny"
OMNI = "qwen2_5_omni-tiny"
GEMMA3 = "gemma3-tiny"
QWEN_TINIES = (TINY, QWEN3_VL, OMNI)
TINIES = (*QWEN_TINIES, GEMMA3)
# Every file whose bytes a loader reads; the marker is checked separately.
CHECKPOINT_FILES = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "time_series/config.json",
    "time_series/model.safetensors",
}
EXPECTED_IDS = {
    "<|endoftext|>": 0,
    "<|im_start|>": 1,
    "<|im_end|>": 2,
    "<|vision_start|>": 3,
    "<|vision_end|>": 4,
    "<|image_pad|>": 5,
    "<|video_pad|>": 6,
    "<|IMAGE|>": 7,
    "<|VIDEO|>": 8,
    "<|AUDIO|>": 9,
    "<|vision_bos|>": 10,
    "<|vision_eos|>": 11,
    "<|audio_bos|>": 12,
    "<|audio_eos|>": 13,
    "<|time_series|>": 14,
    "<|ts_start|>": 15,
    "<|ts_end|>": 16,
    "<bos>": 17,
    "<start_of_turn>": 18,
    "<end_of_turn>": 19,
    "<start_of_image>": 20,
    "<image_soft_token>": 21,
    "<end_of_image>": 22,
    # Reserved slots are named by id: these names sat on these ids before the time-series and Gemma 3 tokens came.
    "<|reserved_special_token_9|>": 23,
    "<|reserved_special_token_17|>": 31,
}
# name -> (model class, processor class, config class, modalities its monolithic generate takes)
FAMILIES: dict[str, tuple[type, type, type, tuple[str, ...]]] = {
    TINY: (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2_5_VLConfig, ("text", "image", "video")),
    QWEN3_VL: (Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLConfig, ("text", "image", "video")),
    OMNI: (
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2_5OmniProcessor,
        Qwen2_5OmniConfig,
        ("text", "image", "video", "audio"),
    ),
    GEMMA3: (Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3Config, ("text", "image")),
}
#: generation_config.eos_token_id: the end of a turn, then the end of a document.
EOS_IDS = {GEMMA3: [19, 0]}


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (the time_series/ subfolder included)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def tiny_dir(cache_root: Path) -> Path:
    return ensure_checkpoint(TINY, cache_root)


class Loaded:
    """A family's checkpoint folder, processor and model, loaded once per module."""

    def __init__(self, name: str, cache_root: Path) -> None:
        model_cls = FAMILIES[name][0]
        self.name = name
        self.path = ensure_checkpoint(name, cache_root)
        self.processor: Any = AutoProcessor.from_pretrained(self.path)
        self.model: Any = model_cls.from_pretrained(self.path).eval()


@pytest.fixture(scope="module")
def loaded(cache_root: Path) -> dict[str, Loaded]:
    return {}


@pytest.fixture(params=TINIES)
def family(request: pytest.FixtureRequest, loaded: dict[str, Loaded], cache_root: Path) -> Loaded:
    name: str = request.param
    if name not in loaded:
        loaded[name] = Loaded(name, cache_root)
    return loaded[name]


@pytest.fixture(scope="module")
def processor(tiny_dir: Path) -> Qwen2_5_VLProcessor:
    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).eval()


def test_registry_lists_every_family_in_two_sizes() -> None:
    families = ("qwen2_5_vl", "qwen3_vl", "qwen2_5_omni", "gemma3", "voxtral")
    assert {f"{family}-{size}" for family in families for size in ("tiny", "mid")} == set(CHECKPOINTS)
    assert {spec.family for spec in CHECKPOINTS.values()} == set(FAMILY_MODULES) == set(families)
    assert all(spec.initializer_range == 0.3 for spec in CHECKPOINTS.values())
    with pytest.raises(ValueError, match=r"known: .*qwen2_5_vl-tiny"):
        ensure_checkpoint("no-such-model")


@pytest.mark.parametrize("name", TINIES)
def test_folder_layout_and_marker(name: str, cache_root: Path) -> None:
    folder = ensure_checkpoint(name, cache_root)
    assert folder.name == f"{name}-{generator_digest()}"
    assert folder.parent.name == "checkpoints"
    assert CHECKPOINT_FILES | {MARKER, "time_series"} == {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    assert read_marker(folder) == {
        "name": name,
        "family": CHECKPOINTS[name].family,
        "random_weights": True,
        "generator_digest": generator_digest(),
    }
    # No temp folders left beside it.
    assert [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("name", TINIES)
def test_builds_are_byte_identical(name: str, cache_root: Path, tmp_path: Path) -> None:
    first_dir = ensure_checkpoint(name, cache_root)
    torch.manual_seed(987654)  # whatever the caller's RNG state, the build seeds itself
    again = ensure_checkpoint(name, tmp_path)
    assert again != first_dir
    first, second = file_hashes(first_dir), file_hashes(again)
    assert CHECKPOINT_FILES | {MARKER} == set(first)
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

    # The time-series adapter's code lives outside the package but decides bytes too.
    adapter_source = tiny_cache._module_source("mmserve.models.time_series_adapter")
    with monkeypatch.context() as patch:
        patch.setattr(tiny_cache, "_module_source", lambda module: adapter_source + b"# edited\n")
        assert digest_of(package) not in (real, edited)
    assert digest_of(package) == real

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


@pytest.mark.slow  # two builder processes
@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks to see lock waiters")
def test_two_processes_build_once(tmp_path: Path, tiny_dir: Path) -> None:
    """Both processes queue on the lock while we hold it; on release exactly one builds."""
    cache_dir = tmp_path / "shared-cache"
    final = tiny_cache.checkpoint_dir(TINY, cache_dir)
    final.parent.mkdir(parents=True)
    command = [sys.executable, "-m", "mmserve.models.tiny", "--name", TINY, "--cache-dir", str(cache_dir)]
    with open(tiny_cache.lock_path(final), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
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
    assert tokenizer("<|ts_start|><|time_series|><|time_series|><|ts_end|>").input_ids == [15, 14, 14, 16]
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
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (expected + "<|im_start|>assistant\n")
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


def test_monolithic_generate_from_text_is_not_degenerate(processor: Qwen2_5_VLProcessor, model: Qwen2_5_VLForConditionalGeneration) -> None:
    prompt = processor.apply_chat_template([{"role": "user", "content": "Tell me about the lighthouse."}], add_generation_prompt=True)
    tokens = _greedy(model, processor(text=[prompt], return_tensors="pt"))
    assert len(tokens) >= 20 and len(set(tokens)) >= 10, tokens


def test_image_features_are_per_image_in_llm_space(processor: Qwen2_5_VLProcessor, model: Qwen2_5_VLForConditionalGeneration) -> None:
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


# --- every family -------------------------------------------------------------------------------

IMAGE_TOKEN = {TINY: "<|image_pad|>", QWEN3_VL: "<|image_pad|>", OMNI: "<|IMAGE|>"}
VIDEO_TOKEN = {TINY: "<|video_pad|>", QWEN3_VL: "<|video_pad|>", OMNI: "<|VIDEO|>"}


def _video(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)


def _audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * seed) * t) + rng.normal(0, 0.05, t.shape)).astype(np.float32)


def _media_kwargs(name: str, modality: str, seed: int) -> dict[str, Any]:
    """Processor keyword arguments for one item of `modality` (its variant `seed`)."""
    if modality == "image":
        return {"images": [_image(96, 64, seed=seed)]}
    if modality == "video":
        # 4 frames of 4 fps video; Qwen3-VL samples 2 fps from it and needs the metadata for timestamps.
        kwargs: dict[str, Any] = {"videos": [_video(4, 64, 96, seed=seed)]}
        if name == QWEN3_VL:
            kwargs["video_metadata"] = [{"fps": 4.0, "total_num_frames": 4}]
        return kwargs
    if modality == "audio":
        return {"audio": [_audio(1.5, seed=seed)]}
    return {}


def _inputs(family: Loaded, modality: str, seed: int = 1) -> dict[str, torch.Tensor]:
    text = {"text": "Tell me about the lighthouse.", "image": "Describe it.", "video": "What happens?"}
    content: str | list[dict[str, str]] = text.get(modality, "What is this sound?")
    if modality != "text":
        content = [{"type": modality}, {"type": "text", "text": str(text.get(modality, content))}]
    prompt = family.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return family.processor(text=[prompt], return_tensors="pt", **_media_kwargs(family.name, modality, seed))


def test_loads_with_auto_processor_and_its_model_class(family: Loaded) -> None:
    model_cls, processor_cls, config_cls, _ = FAMILIES[family.name]
    assert type(family.processor) is processor_cls
    assert type(family.model) is model_cls
    assert type(AutoConfig.from_pretrained(family.path)) is config_cls
    text = family.model.config.get_text_config()
    assert (text.vocab_size, text.initializer_range) == (2048, 0.3)
    assert len(family.processor.tokenizer) == 2048
    assert all(p.dtype == torch.float32 for p in family.model.parameters())
    assert 0.8e6 < family.model.num_parameters() < 2e6
    assert 0.25 < family.model.lm_head.weight.std().item() < 0.35  # initializer_range reached the weights
    assert list(family.model.generation_config.eos_token_id) == EOS_IDS.get(family.name, [2, 0])
    assert family.model.generation_config.pad_token_id == 0


def test_loads_without_missing_or_unexpected_weights(family: Loaded) -> None:
    model_cls = FAMILIES[family.name][0]
    _, info = model_cls.from_pretrained(family.path, output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}


def test_time_series_adapter_is_attached(family: Loaded) -> None:
    adapter = TimeSeriesAdapter.from_pretrained(family.path / "time_series").eval()
    config = adapter.config
    assert isinstance(config, TimeSeriesAdapterConfig)
    assert config.out_hidden_size == family.model.config.get_text_config().hidden_size
    assert config.initializer_range == 0.3
    tokenizer = family.processor.tokenizer
    for token in (config.placeholder_token, config.start_token, config.end_token):
        ids = tokenizer(token, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] == EXPECTED_IDS[token], token
    values = torch.randn(250, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        embeds = adapter(values, 50.0)
    assert embeds.shape == (config.num_tokens(250, 3, 50.0), family.model.config.get_text_config().hidden_size)
    assert torch.isfinite(embeds).all()


@pytest.mark.parametrize(("name", "modality"), [(name, modality) for name in TINIES for modality in FAMILIES[name][3]])
def test_monolithic_generate_is_not_degenerate(loaded: dict[str, Loaded], cache_root: Path, name: str, modality: str) -> None:
    if name not in loaded:
        loaded[name] = Loaded(name, cache_root)
    family = loaded[name]
    inputs = _inputs(family, modality)
    tokens = _greedy(family.model, inputs)
    assert len(tokens) >= 20 and len(set(tokens)) >= 10, tokens
    if modality != "text":  # the media matters: another item changes the answer
        assert _greedy(family.model, _inputs(family, modality, seed=2)) != tokens


@pytest.mark.parametrize("name", QWEN_TINIES)  # Gemma 3 has no grids: a fixed count per image (its specifics below)
def test_placeholders_match_the_grids(loaded: dict[str, Loaded], cache_root: Path, name: str) -> None:
    if name not in loaded:
        loaded[name] = Loaded(name, cache_root)
    family = loaded[name]
    tokenizer = family.processor.tokenizer
    for modality, pad, grid_key in (("image", IMAGE_TOKEN, "image_grid_thw"), ("video", VIDEO_TOKEN, "video_grid_thw")):
        inputs = _inputs(family, modality)
        grid = inputs[grid_key][0].tolist()
        count = (inputs["input_ids"][0] == tokenizer.convert_tokens_to_ids(pad[family.name])).sum().item()
        assert count == grid[0] * grid[1] * grid[2] // 4


# --- Qwen3-VL specifics --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3(loaded: dict[str, Loaded], cache_root: Path) -> Loaded:
    if QWEN3_VL not in loaded:
        loaded[QWEN3_VL] = Loaded(QWEN3_VL, cache_root)
    return loaded[QWEN3_VL]


@pytest.fixture(scope="module")
def omni(loaded: dict[str, Loaded], cache_root: Path) -> Loaded:
    if OMNI not in loaded:
        loaded[OMNI] = Loaded(OMNI, cache_root)
    return loaded[OMNI]


def test_qwen3_vl_config(qwen3: Loaded) -> None:
    config = qwen3.model.config
    text, vision = config.text_config, config.vision_config
    assert (config.image_token_id, config.video_token_id) == (5, 6)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (3, 4)
    assert len(vision.deepstack_visual_indexes) >= 2
    assert max(vision.deepstack_visual_indexes) < vision.depth - 1
    assert text.rope_parameters["mrope_interleaved"] is True
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2 == text.hidden_size // text.num_attention_heads // 2
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (16, 2, 2)
    assert vision.out_hidden_size == text.hidden_size and vision.initializer_range == 0.3
    image_processor, video_processor = qwen3.processor.image_processor, qwen3.processor.video_processor
    assert isinstance(image_processor, Qwen2VLImageProcessor) and isinstance(video_processor, Qwen3VLVideoProcessor)
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (16, 2, 2)
    assert (video_processor.patch_size, video_processor.merge_size, video_processor.temporal_patch_size) == (16, 2, 2)
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (65536, 16777216)
    assert (video_processor.size["shortest_edge"], video_processor.size["longest_edge"]) == (4096, 25165824)
    assert video_processor.fps == 2


def test_qwen3_vl_chat_template_and_video_timestamps(qwen3: Loaded) -> None:
    processor = qwen3.processor
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": "Same."},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "Compare.<|im_end|>\n<|im_start|>assistant\nSame.<|im_end|>\n<|im_start|>assistant\n"
    )  # no default system prompt
    with_system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")

    # 8 frames at 4 fps, sampled at 2 fps -> frames [0, 2, 5, 7] -> 2 temporal patches stamped with the
    # mean time of their two frames, each its own vision block inside the template's outer wrapper.
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(
        text=[prompt],
        videos=[_video(8, 64, 96, seed=0)],
        video_metadata=[{"fps": 4.0, "total_num_frames": 8}],
        return_tensors="pt",
    )
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]]
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    frame = "<|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>"
    assert text == (
        f"<|im_start|>user\n<|vision_start|><0.2 seconds>{frame}<1.5 seconds>{frame}<|vision_end|>"
        "What happens?<|im_end|>\n<|im_start|>assistant\n"
    )
    types = inputs["mm_token_type_ids"][0]
    assert types.tolist() == [2 if t == 6 else 0 for t in inputs["input_ids"][0].tolist()]


def test_qwen3_vl_features_carry_deepstack(qwen3: Loaded) -> None:
    processor, model = qwen3.processor, qwen3.model
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], add_generation_prompt=True
    )
    inputs = processor(text=[prompt], images=[_image(96, 64, seed=1), _image(56, 140, seed=3)], return_tensors="pt")
    grids = inputs["image_grid_thw"]
    with torch.inference_mode():
        out = model.get_image_features(inputs["pixel_values"], grids)
    sizes = [int(g.prod()) // 4 for g in grids]
    assert sizes[0] != sizes[1]
    assert [tuple(f.shape) for f in out.pooler_output] == [(n, 128) for n in sizes]
    layers = model.config.vision_config.deepstack_visual_indexes
    assert len(out.deepstack_features) == len(layers)
    assert all([tuple(f.shape) for f in layer] == [(n, 128) for n in sizes] for layer in out.deepstack_features)

    # DeepStack matters: the LLM's output changes without it.
    ids = inputs["input_ids"]
    mask = ids == model.config.image_token_id
    with torch.inference_mode():
        embeds = model.model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), torch.cat(out.pooler_output))
        positions, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=grids)
        deepstack = [torch.cat(layer) for layer in out.deepstack_features]
        language_model = model.model.language_model
        with_ds = language_model(inputs_embeds=embeds, position_ids=positions, visual_pos_masks=mask, deepstack_visual_embeds=deepstack)
        without = language_model(inputs_embeds=embeds, position_ids=positions)
        reference = model(**inputs)
        logits = model.lm_head(with_ds.last_hidden_state)
    assert not torch.allclose(with_ds.last_hidden_state, without.last_hidden_state)
    assert torch.equal(logits, reference.logits)


# --- Qwen2.5-Omni specifics ----------------------------------------------------------------------


def test_omni_layout_and_config(omni: Loaded) -> None:
    saved = AutoConfig.from_pretrained(omni.path)
    assert isinstance(saved, Qwen2_5OmniConfig) and saved.enable_audio_output is False  # laid out like the real ones
    config = omni.model.config
    assert isinstance(config, Qwen2_5OmniThinkerConfig)
    assert (config.image_token_id, config.video_token_id, config.audio_token_id) == (7, 8, 9)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (10, 11)
    assert (config.audio_start_token_id, config.audio_end_token_id) == (12, 13)
    assert (config.position_id_per_seconds, config.seconds_per_chunk) == (25, 2)
    text, vision, audio = config.text_config, config.vision_config, config.audio_config
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert vision.out_hidden_size == audio.output_dim == text.hidden_size
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert audio.num_mel_bins == 128
    assert vision.initializer_range == audio.initializer_range == config.initializer_range == 0.3
    assert not any(key.startswith(("talker", "token2wav")) for key in omni.model.state_dict())


def test_omni_processor(omni: Loaded) -> None:
    processor = omni.processor
    assert isinstance(processor.feature_extractor, WhisperFeatureExtractor)
    assert isinstance(processor.image_processor, Qwen2VLImageProcessor)
    assert isinstance(processor.video_processor, Qwen2VLVideoProcessor)
    extractor = processor.feature_extractor
    assert (extractor.feature_size, extractor.sampling_rate, extractor.hop_length) == (128, 16000, 160)
    assert extractor.n_samples == 300 * 16000 and extractor.return_attention_mask  # the real checkpoints pad to 300 s
    tokenizer = processor.tokenizer
    for attribute, token in {
        "image_token": "<|IMAGE|>",
        "video_token": "<|VIDEO|>",
        "audio_token": "<|AUDIO|>",
        "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
        "audio_bos_token": "<|audio_bos|>",
        "audio_eos_token": "<|audio_eos|>",
    }.items():
        assert getattr(tokenizer, attribute) == token

    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "audio"}, {"type": "video"}, {"type": "text", "text": "All?"}],
        }
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|><|vision_bos|><|VIDEO|><|vision_eos|>"
        "All?<|im_end|>\n<|im_start|>assistant\n"
    )

    inputs = _inputs(omni, "audio")  # 1.5 s -> 150 mel frames -> 37 tokens
    assert tuple(inputs["input_features"].shape) == (1, 128, 30000)
    assert int(inputs["feature_attention_mask"].sum()) == 150
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(9) == ((150 - 1) // 2 + 1 - 2) // 2 + 1 == 37
    assert ids[ids.index(9) - 1] == 12 and ids[ids.index(9) + 37] == 13  # wrapped in audio bos/eos
    with torch.inference_mode():
        audio = omni.model.get_audio_features(inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"])
    assert tuple(audio.last_hidden_state.shape) == (37, 128)


# --- Gemma 3 specifics ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3(loaded: dict[str, Loaded], cache_root: Path) -> Loaded:
    if GEMMA3 not in loaded:
        loaded[GEMMA3] = Loaded(GEMMA3, cache_root)
    return loaded[GEMMA3]


def test_gemma3_config(gemma3: Loaded) -> None:
    config = gemma3.model.config
    text = config.text_config
    assert text.layer_types == ["sliding_attention", "full_attention"]
    assert text.sliding_window == 32  # shorter than the test prompts: the window is exercised
    assert text.query_pre_attn_scalar == text.head_dim == 32
    assert (config.boi_token_id, config.image_token_id, config.eoi_token_id) == (20, 21, 22)
    assert config.mm_tokens_per_image == 16 and config.vision_config.image_size == 112
    assert not config.vision_config.vision_use_head
    assert gemma3.model.model.multi_modal_projector.mm_input_projection_weight.std() > 0.25  # not transformers' zeros
    embed = gemma3.model.model.language_model.embed_tokens
    assert float(embed.embed_scale) == pytest.approx(text.hidden_size**0.5)


def test_gemma3_processor_expands_each_image_as_the_real_one(gemma3: Loaded) -> None:
    processor, tokenizer = gemma3.processor, gemma3.processor.tokenizer
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<bos>", "<end_of_turn>")
    assert (tokenizer.boi_token, tokenizer.image_token, tokenizer.eoi_token) == ("<start_of_image>", "<image_soft_token>", "<end_of_image>")
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>Describe it.<end_of_turn>\n<start_of_turn>model\n"
    inputs = processor(text=[text], images=[_image(96, 64, seed=1)], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(21) == 16 and ids.count(20) == ids.count(22) == 1
    assert inputs["token_type_ids"][0].tolist() == [int(t == 21) for t in ids]
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 112, 112)
