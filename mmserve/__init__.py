"""mmserve: code shared by the encoder, decoder and gateway.

Keep this package import-light: the gateway imports it and must never pull in
torch or transformers. Model and media code lives in subpackages that only the
services import.
"""

__version__ = "0.1.0"
