"""The decoder service: owns the LLM; resolves media parts to stored embeddings and generates."""
