"""The OpenAI-compatible REST gateway: chat completions over the decoder's gRPC API.

Thin by design: no torch, no transformers, no media decoding. It translates
JSON to protobuf and back, maps gRPC status to HTTP errors, and streams SSE.
"""
