"""Model families: loading a checkpoint and the encoder/decoder halves of each family.

Imports torch and transformers; only the encoder and decoder services import it.
"""
