"""Opening a checkpoint's files: regular files only, every read bounded by the file's size.

A FIFO, socket or device given as ``config.json``, an index or a shard (directly or through a
symlink) would block in ``open()`` or be read forever (``/dev/zero``): :func:`open_regular`
checks the kind of file before opening it, opens without blocking, and checks again on the open
descriptor (the name could be swapped in between). JSON is parsed from at most the file's size,
itself bounded, and a document nested too deeply for the parser is refused naming the file.

Example:
    >>> import json, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "config.json")
    >>> with open(path, "w") as f:
    ...     json.dump({"hidden_size": 4096}, f)
    >>> load_json(path, "config.json", MAX_CONFIG)
    {'hidden_size': 4096}
    >>> load_json("/dev/null", "config.json", MAX_CONFIG)
    Traceback (most recent call last):
    ...
    mtp.checkpoint.errors.CheckpointError: /dev/null: config.json is a character device, not a regular file; point to the real file
"""  # noqa: E501

from __future__ import annotations

import json
import os
import stat

from .errors import CheckpointError

MAX_CONFIG = 16 << 20  # a config.json is a few KiB; anything near this is not one
MAX_INDEX = 256 << 20  # the releases' index is ~7 MiB for ~70k tensor names
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))
_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_BINARY", 0)


def _refuse_irregular(path: str, mode: int, what: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((k for test, k in _KINDS if test(mode)), "not a file")
    raise CheckpointError(f"{path}: {what} is {kind}, not a regular file; point to the real "
                          f"file")


def open_regular(path: str, what: str) -> tuple[int, int]:
    """``(fd, size)`` of the regular file at ``path`` (symlinks followed), opened read-only
    without blocking. Anything else raises :class:`CheckpointError` naming ``what`` it should
    have been; a missing file raises ``FileNotFoundError``."""
    _refuse_irregular(path, os.stat(path).st_mode, what)  # before open: a FIFO would block it
    fd = os.open(path, _FLAGS)
    try:
        st = os.fstat(fd)  # the file actually opened
        _refuse_irregular(path, st.st_mode, what)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_bytes(path: str, what: str, limit: int) -> bytes:
    """The whole regular file, refused beyond ``limit`` bytes; never reads past the size the
    file system stated when it was opened."""
    fd, size = open_regular(path, what)
    try:
        if size > limit:
            raise CheckpointError(f"{path}: {what} has {size} bytes, more than the {limit} a "
                                  f"{what} can sensibly have; is it the right file?")
        chunks, got = [], 0
        while got < size:
            chunk = os.read(fd, size - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_json(raw: bytes | str, where: str, what: str, object_pairs_hook=None):
    """``json.loads`` with every failure as a :class:`CheckpointError` naming ``where``."""
    try:
        return json.loads(raw, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise CheckpointError(f"{where}: {what} is nested too deeply to parse (a damaged or "
                              f"hostile file)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: {what} is not valid JSON ({e})") from None


def load_json(path: str, what: str, limit: int, object_pairs_hook=None):
    """Parse the regular file at ``path`` (at most ``limit`` bytes) as JSON."""
    return parse_json(read_bytes(path, what, limit), path, what, object_pairs_hook)


__all__ = ["open_regular", "read_bytes", "parse_json", "load_json", "MAX_CONFIG", "MAX_INDEX"]
