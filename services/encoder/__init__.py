"""The encoder service: fetches and decodes media, runs the modality towers, stores embeddings."""
