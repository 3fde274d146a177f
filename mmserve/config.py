"""Configuration for every mmserve process, read from `MMSERVE_*` environment variables.

One flat settings class so that every knob has exactly one name, one default
and one place where it is documented (the README's configuration table is
generated from these field descriptions). Services take a `Settings` instance
instead of reading the environment themselves, so tests can build one
explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """All mmserve settings; env var = `MMSERVE_` + field name in upper case."""

    model_config = SettingsConfigDict(env_prefix="MMSERVE_", extra="ignore", protected_namespaces=())

    # --- model -----------------------------------------------------------
    model: str = Field(
        "tiny",
        description=(
            "Hub id, local folder, `tiny` (the built-in random-weight demo: Qwen2.5-Omni thinker + time-series adapter) "
            "or `tiny:<name>` (qwen2_5_vl-tiny, qwen3_vl-tiny, qwen2_5_omni-tiny, gemma3-tiny, voxtral-tiny, and -mid sizes)."
        ),
    )
    model_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    dtype: str = Field("auto", description="auto (the checkpoint's dtype), float32, bfloat16 or float16.")
    device: str = Field("cpu", description="Torch device for the encoder and decoder, e.g. cpu or cuda:0.")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "mmserve",
        description="Where generated tiny checkpoints are cached.",
    )

    # --- network ---------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the services bind to (0.0.0.0 in containers).")
    encoder_port: int = Field(50051, description="gRPC port of the encoder service.")
    decoder_port: int = Field(50052, description="gRPC port of the decoder service.")
    gateway_port: int = Field(8000, description="HTTP port of the OpenAI-compatible gateway.")
    encoder_target: str = Field(
        "127.0.0.1:50051",
        description="gRPC target the decoder uses to reach encoders (e.g. dns:///encoder:50051, round-robin).",
    )
    decoder_target: str = Field("127.0.0.1:50052", description="gRPC target the gateway uses to reach decoders.")
    grpc_max_message_bytes: int = Field(
        80 * MiB,
        description="Max gRPC message size on both sides; larger media goes through the streaming upload RPC.",
    )
    shutdown_grace_s: float = Field(10.0, description="Seconds in-flight RPCs get to finish on SIGTERM.")
    grpc_max_connection_age_s: float = Field(
        30.0,
        gt=0,
        description="The encoder and decoder close each client connection after about this long (gRPC max_connection_age, +-10% jitter; running calls finish): the client reconnects and re-resolves its DNS name then, so a replica added behind the name gets calls within this (x1.1) plus a second or two.",
    )
    service_token: SecretStr | None = Field(
        None,
        description="Shared secret of the encoder, decoder and gateway: the gRPC services serve only calls that carry it (`x-mmserve-service-token` metadata; health and reflection stay open) and trust their `x-mmserve-tenant` only then. Unset: anyone who reaches a port is served, as any tenant (local/dev only; logged at start). `mmserve up` makes a random one per stack.",
    )

    service_token_file: Path | None = Field(
        None,
        description="A file holding the service token, read when MMSERVE_SERVICE_TOKEN is unset (a mounted secret; compose's `token` job writes one with `mmserve token FILE`).",
    )

    # --- store -----------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "Redis holding the embeddings: `redis://host:port/db` (or `rediss://`, `unix://`), a Redis Cluster as "
            "`redis+cluster://host:port[,host:port...]`, or Sentinel as `redis+sentinel://host:port[,...]/<service>`."
        ),
    )
    store_health_interval_s: float = Field(
        5.0,
        description=(
            "Seconds between the encoder's and decoder's store probes (a small write): health is NOT_SERVING "
            "while the store cannot take one (down, read-only, CLUSTERDOWN), SERVING again once it can."
        ),
        gt=0,
    )
    embedding_ttl_s: int = Field(
        7 * 24 * 3600,
        description=(
            "Lifetime of a stored embedding in seconds, sliding: an encode stores it for this long, and each chat "
            "that reads it (or a re-encode that finds it) resets it to this long again, at most once per "
            "`MMSERVE_EMBEDDING_TTL_REFRESH_S`; so an embedding expires this long after its last use. "
            "0 keeps embeddings until Redis evicts them (maxmemory policy)."
        ),
        ge=0,
    )
    embedding_ttl_refresh_s: int = Field(
        3600,
        ge=0,
        description=(
            "Rate limit of the sliding expiry: a read resets an embedding's lifetime only once more than this "
            "many seconds of it have passed (at most half the TTL), so a hot embedding is not re-touched on every "
            "read; checked in the read's own round trip."
        ),
    )
    store_chunk_bytes: int = Field(
        64 * MiB,
        gt=0,
        le=512 * MiB,
        description=(
            "Embeddings larger than this are stored as several Redis values of at most this size (Redis refuses "
            "values over 512 MB), written and made visible all at once and reassembled on read."
        ),
    )
    store_max_record_bytes: int = Field(
        2048 * MiB,
        gt=0,
        description=(
            "Largest embedding (all its tensors) the store accepts; a bigger one is refused before any upload "
            "(INVALID_ARGUMENT, reason MEDIA_TOO_LARGE, naming this limit)."
        ),
    )
    encode_lease_ms: int = Field(
        30_000,
        description=(
            "Lifetime of an encoder's lease on content it is encoding (renewed while it works): other encoder "
            "replicas wait for its result instead of running the model; a lease whose holder died expires after this."
        ),
        gt=0,
    )
    decoder_cache_bytes: int = Field(
        256 * MiB,
        description=(
            "Bytes of recently used embeddings each decoder keeps in memory (LRU; 0 = off). Every use still checks "
            "the record's seal in Redis (one small read, no tensor bytes), so a delete or overwrite is seen at once."
        ),
        ge=0,
    )
    tenant: str = Field(
        "default",
        description="Tenant of every call when no API key identifies one (gateway), or no tenant metadata comes with it (services).",
    )
    redis_persist: bool = Field(
        True,
        description=(
            "`mmserve up`'s own redis-server keeps embeddings across restarts (append-only file, fsync every second); "
            "false: memory only (also `mmserve up --no-persist`). Not used with `MMSERVE_REDIS_URL`."
        ),
    )
    redis_data_dir: Path | None = Field(
        None, description="Folder of `mmserve up`'s redis-server append-only file (default: `<cache_dir>/redis`)."
    )

    # --- fetch guard (docs/inputs.md section 2) --------------------------
    fetch_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="If set, only these host names may be fetched (comma-separated)."
    )
    fetch_max_redirects: int = Field(3, description="Redirects followed per item, each re-checked.")
    fetch_timeout_image_s: float = Field(5.0, description="Total deadline to fetch one image.")
    fetch_timeout_audio_s: float = Field(10.0, description="Total deadline to fetch one audio item.")
    fetch_timeout_video_s: float = Field(30.0, description="Total deadline to fetch one video.")
    fetch_timeout_time_series_s: float = Field(10.0, description="Total deadline to fetch one time series.")
    fetch_allow_loopback: bool = Field(False, description="TEST ONLY: let the fetcher reach loopback addresses. Logged loudly when on.")
    file_root: Path | None = Field(None, description="If set, file:// URLs are allowed below this folder only.")
    max_item_bytes: int = Field(64 * MiB, description="Max encoded size of one media item.")
    max_request_media_bytes: int = Field(256 * MiB, description="Max encoded size of all media in one request.")
    max_upload_bytes: int = Field(1024 * MiB, description="Max size of one item sent through the streaming EncodeUpload RPC.")

    # --- per-request item limits (docs/inputs.md section 4) ---------------
    max_images_per_request: int = Field(8, description="Images allowed in one request.")
    max_videos_per_request: int = Field(2, description="Videos allowed in one request.")
    max_audios_per_request: int = Field(4, description="Audio items allowed in one request.")
    max_time_series_per_request: int = Field(4, description="Time series allowed in one request.")

    # --- decoding limits (docs/inputs.md sections 3 and 4) ---------------
    image_max_pixels: int = Field(178_956_970, description="Refuse images larger than this from the header.")
    media_max_decoded_bytes: int = Field(
        512 * MiB,
        description="Most memory one image or video may decode to (its pixels and their RGB copy, before the model's resize): a JPEG over it decodes at a reduced scale, anything else is refused from its header.",
    )
    request_pixel_budget: int = Field(400_000_000, description="Decoded pixels (images + video frames) allowed in one request.")
    video_default_fps: float = Field(2.0, description="Frames sampled per second of video by default.")
    video_default_num_frames: int = Field(32, description="Frames sampled per video at most, by default.")
    video_max_num_frames: int = Field(768, description="Hard cap on frames sampled per video.")
    video_max_duration_s: float = Field(600.0, description="Refuse videos longer than this.")
    video_max_frame_pixels: int = Field(8_294_400, description="Refuse videos whose frames are larger than this (default 4K).")
    audio_max_duration_s: float = Field(600.0, description="Refuse audio longer than this (decoded).")
    audio_max_decoded_bytes: int = Field(256 * MiB, description="Refuse audio whose decoded samples exceed this.")
    time_series_max_samples: int = Field(240_000, description="Refuse time series longer than this.")

    # --- encoder ---------------------------------------------------------
    encoder_max_batch: int = Field(8, description="Items the encoder runs through a tower in one batch.")
    encoder_batch_wait_ms: float = Field(
        0.0,
        description="How long an idle encoder waits for more items before running a batch; 0: at once (items that arrive while the tower is busy are batched anyway).",
    )

    # --- decoder ---------------------------------------------------------
    decoder_engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What makes the tokens: `transformers` (built-in: continuous batching, KV budget, prefix cache) or `vllm` (vLLM's engine fed the stored embeddings; needs the vLLM environment, scripts/build-vllm-env).",
    )
    max_running_requests: int = Field(16, description="Requests one decoder batches together (decoding at once).")
    max_waiting_requests: int = Field(64, description="Generate calls queued beyond that before 429.")
    default_max_tokens: int = Field(256, description="Completion tokens when the request sets none.")
    max_model_len: int = Field(32768, description="Prompt plus completion tokens allowed per request.")
    kv_cache_tokens: int | None = Field(
        None, ge=1, description="KV cache budget of the built-in engine in tokens (default: from kv_cache_bytes, else from free memory)."
    )
    kv_cache_bytes: int | None = Field(None, ge=1, description="KV cache budget in bytes, if kv_cache_tokens is unset.")
    kv_cache_memory_fraction: float = Field(
        0.3,
        gt=0,
        le=0.95,
        description="Share of free memory (CPU: MemAvailable, CUDA: free device memory) for the KV cache when no budget is set.",
    )
    prefill_chunk_tokens: int = Field(
        512, ge=16, description="Prompt tokens prefilled per engine iteration; longer prompts go in chunks between decode steps."
    )
    onednn_linears: bool = Field(
        True,
        description="On CPU, run the language model's linear layers through oneDNN: a row's result no longer depends on the batch, and decode batches run faster (docs/engine.md).",
    )
    patch_embed_matmul: bool = Field(
        True,
        description="Run the vision towers' patch convolutions (kernel = stride) as one matmul: ~4x faster on CPU, equal up to float rounding (mmserve/models/patch_embed.py).",
    )
    onednn_min_weights: int = Field(
        1 << 18, ge=0, description="Linear layers with fewer weights stay on MKL (oneDNN's per-call cost would exceed their product)."
    )
    engine_threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads of the built-in engine's model thread; 0 = auto: one for a language model under 8M weights (a thread hand-off costs more than it saves there), else torch's default (all cores).",
    )
    prefix_cache: bool = Field(True, description="Reuse the KV of earlier prompts that start the same way (same text, same media).")
    prefix_cache_block_tokens: int = Field(16, ge=1, description="Tokens per prefix-cache block (the unit of reuse).")
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="vLLM engine: GPUs one model is split across (tensor parallel).")
    vllm_pipeline_parallel_size: int = Field(1, ge=1, description="vLLM engine: pipeline stages.")
    vllm_gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM engine: share of GPU memory vLLM may use (weights + KV cache)."
    )
    vllm_cpu_kv_cache_gib: float = Field(4.0, gt=0, description="vLLM engine on CPU: KV cache size in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE).")
    vllm_enforce_eager: bool = Field(False, description="vLLM engine: no CUDA graphs / compilation (faster start, slower decode).")

    # --- gateway ---------------------------------------------------------
    api_key: str | None = Field(
        None, description="If set, the gateway requires `Authorization: Bearer <key>`; the key is one tenant (`key-<sha256 prefix>`)."
    )
    api_keys: SecretStr | None = Field(
        None,
        description="More API keys, each its own tenant: comma-separated `tenant:key` pairs (a tenant may have several keys). Content ids and uuids are visible to their tenant only.",
    )
    api_keys_file: Path | None = Field(
        None, description="A file of `tenant:key` lines (`#` comments), read at gateway start; adds to the keys above."
    )
    max_body_bytes: int = Field(64 * MiB, description="Largest request body the gateway accepts (413 above).")
    gateway_request_timeout_s: float = Field(600.0, description="Deadline of one chat request, passed to the decoder.")
    sse_keepalive_s: float = Field(15.0, description="Seconds of silence in a stream before a `: keep-alive` comment.")
    gateway_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection whose request headers are not complete this many seconds after its first byte (or after the previous response) is closed (slow-loris).",
    )
    gateway_body_timeout_s: float = Field(
        30.0, gt=0, description="A request body not complete this many seconds after its headers is answered 408 and the connection closed."
    )
    gateway_keepalive_timeout_s: float = Field(
        5.0, gt=0, description="Idle keep-alive connections are closed after this many seconds (uvicorn's timeout_keep_alive)."
    )
    gateway_max_header_bytes: int = Field(
        16384,
        ge=1024,
        description="Largest request line plus headers the gateway reads (uvicorn's h11_max_incomplete_event_size; 400 above).",
    )
    gateway_max_concurrency: int | None = Field(
        2048,
        ge=1,
        description="Open connections plus running requests beyond which the gateway answers 503 (uvicorn's limit_concurrency); unset = no limit.",
    )
    served_model_name: str | None = Field(None, description="Model id shown in /v1/models (default: the model).")

    # --- observability ---------------------------------------------------
    metrics_port: int | None = Field(None, description="HTTP port for /metrics of a gRPC service (off if unset).")
    log_json: bool = Field(False, description="Log one JSON object per line instead of text.")
    log_level: str = Field("INFO", description="Python log level.")
    otlp_endpoint: str | None = Field(None, description="OTLP endpoint for traces; tracing is off when unset.")

    @field_validator(
        "model_revision",
        "file_root",
        "api_key",
        "api_keys",
        "api_keys_file",
        "service_token",
        "service_token_file",
        "otlp_endpoint",
        "served_model_name",
        "metrics_port",
        "kv_cache_tokens",
        "kv_cache_bytes",
        "redis_data_dir",
        "gateway_max_concurrency",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`VAR=` (as compose writes `${VAR:-}`) means unset, not an empty value."""
        return None if value == "" else value

    @field_validator("fetch_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    def local_redis_dir(self) -> Path | None:
        """Where `mmserve up`'s own redis-server persists, or None for memory only."""
        if not self.redis_persist:
            return None
        return self.redis_data_dir or self.cache_dir / "redis"


def markdown_table() -> str:
    """The README's configuration reference: every setting, its env var, default and meaning."""
    rows = ["| env var | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, Path):
            default = str(default).replace(str(Path.home()), "~")
        shown = "unset" if default is None else ("empty" if default == [] else f"`{default}`")
        rows.append(f"| `MMSERVE_{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
