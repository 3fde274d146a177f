"""The mmserve gRPC services: encoder (media -> stored embeddings) and decoder (LLM generation)."""
