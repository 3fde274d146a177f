"""The built-in transformers engine: scheduler, KV cache, prefix cache, sampling."""
