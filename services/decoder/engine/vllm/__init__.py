"""The vLLM decoder engine (MMSERVE_DECODER_ENGINE=vllm)."""
