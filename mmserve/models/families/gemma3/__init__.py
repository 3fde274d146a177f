"""The Gemma 3 family (image + text): `gemma3` is the family, `tiny_gemma3` and `templates/` build its random-weight checkpoints.

Registered in pyproject.toml's `mmserve.families` entry points.
"""
