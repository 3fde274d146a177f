"""The Qwen family: Qwen2.5-VL, Qwen3-VL and the Qwen2.5-Omni thinker.

`common` holds what the three share (the vision towers' patch grids, M-RoPE
prompt positions, the Hermes tool-call syntax); each architecture module adds
its own position rule and towers; `tiny_*` build their random-weight
checkpoints from `templates/`. Registered in pyproject.toml's
`mmserve.families` entry points.
"""
