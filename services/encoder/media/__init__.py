"""Media acquisition and decoding for the encoder (docs/inputs.md sections 2 and 3).

`sources` turns a MediaSource into encoded bytes (inline, data:, file://, or
http(s) through the guarded `fetch`er); per-modality decoders (`image`, and
later video, audio, time series) turn those bytes into arrays. `budget` holds
the per-request limits every step draws from.

Import the submodules directly; this package stays import-light so that code
needing only the budget does not pull in Pillow or httpx.
"""
