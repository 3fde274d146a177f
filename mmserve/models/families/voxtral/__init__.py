"""The Voxtral family (audio + text): `voxtral` is the family, `tiny_voxtral` builds its random-weight checkpoints.

Its chats are rendered by mistral_common (the checkpoint's Tekken tokenizer), so it has no Jinja template.
Registered in pyproject.toml's `mmserve.families` entry points.
"""
