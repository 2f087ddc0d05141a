"""Checkpoint I/O: reading DeepSeek-V4 safetensors checkpoints safely.

- :mod:`.errors`: :class:`CheckpointError`, the one exception a refused checkpoint raises.
- :mod:`.files`: opening a checkpoint's files (regular files only, reads bounded by their size)
  and parsing its JSON (config, index).
"""
