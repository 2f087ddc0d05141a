"""Checkpoint I/O: reading DeepSeek-V4 safetensors checkpoints, in three steps.

- :mod:`.source`: step 1, find the files (a folder or a Hub repo), fetch the needed shards.
- :mod:`.plan`: step 2, the plan, built by pure functions: what to read from where, every check.
- :mod:`.stream`: step 3, the one read path from stored tensors into parameters or rank slices.

and beside them :mod:`.header` (safetensors headers, the finiteness check), :mod:`.files`
(regular files only, bounded reads, JSON), :mod:`.report` (the printable ``Plan`` and
``LoadReport``) and :mod:`.errors` (:class:`CheckpointError`). :mod:`mtp.loader` is the public
API over them.
"""
