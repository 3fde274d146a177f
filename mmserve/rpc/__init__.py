"""gRPC plumbing shared by the encoder and decoder: server setup, error mapping, metadata."""
