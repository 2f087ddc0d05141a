"""Fetching a checkpoint's files from the Hugging Face Hub, only the ones the drafter needs.

Everything goes through ``huggingface_hub.hf_hub_download`` into its usual cache, so revision,
cache_dir, token, offline mode and the cache behave as everywhere else. ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` are read when a call is made (``huggingface_hub`` reads them once, at import).
After the first file the revision is pinned to the commit it resolved to, so all files come
from one commit and cached files are served without a request.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class MissingFile(FileNotFoundError):
    """The repo (or, offline, the cache) has no such file; other failures raise otherwise."""


def looks_like_repo_id(s: str) -> bool:
    """``owner/name`` with the Hub's characters (a local folder is checked first)."""
    return bool(_REPO_ID.match(s)) and ".." not in s


def local_path_problem(where: str) -> str | None:
    """Why ``where``, which is not an existing folder, cannot be a Hub repo id either (it is a
    file, reads as a local path, or is no ``owner/name``); None when it goes to the Hub.

    A path is recognised at once instead of asking the Hub about it: it starts with ``.``,
    ``/`` or ``~``, or its first component exists here (``models/x`` with a ``models`` folder).

    Example:
        >>> local_path_problem("deepseek-ai/DeepSeek-V4-Flash") is None
        True
        >>> print(local_path_problem("./checkpoints/DeepSeek-V4-Flash"))
        './checkpoints/DeepSeek-V4-Flash' is neither a folder nor a Hub repo id: it reads as a local path (it starts with '.') and no such folder exists; check the path (Hub repo ids are owner/name)
    """  # noqa: E501
    if os.path.exists(where):
        return (f"{where!r} is a file, not a checkpoint folder; pass the folder that holds "
                f"config.json")
    first = re.split(r"[/\\]", where, maxsplit=1)[0]
    if where.startswith((".", "/", "~", "\\")) or os.path.isabs(where):
        reason = f"it starts with {where[0]!r}"
    elif first and os.path.lexists(first):
        reason = f"{first!r} exists in the current folder {os.getcwd()!r}"
    elif looks_like_repo_id(where):
        return None
    else:
        return f"{where!r} is neither a folder nor a Hub repo id (owner/name)"
    return (f"{where!r} is neither a folder nor a Hub repo id: it reads as a local path "
            f"({reason}) and no such folder exists; check the path (Hub repo ids are "
            f"owner/name)")


_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_revision(revision: str | None) -> None:
    """Refuse a ``revision`` that is not a branch, tag or commit name before it reaches a URL
    or the Hub cache's folders (``refs/{revision}``): git's ref-name rules (no ``..``, no
    control characters, spaces, backslashes or ``~^:?*[``, no leading ``/`` or ``-``, no empty
    or dot-led component, no trailing ``/``, ``.`` or ``.lock``, no ``@{``).

    Example:
        >>> check_revision("main"), check_revision("refs/pr/1"), check_revision("a" * 40)
        (None, None, None)
        >>> check_revision("../../etc")
        Traceback (most recent call last):
        ...
        ValueError: revision='../../etc' is not a branch, tag or commit name: it contains '..'
    """
    if revision is None:
        return
    if not isinstance(revision, str):
        raise TypeError(f"revision: expected a branch, tag or commit name (str), got "
                        f"{type(revision).__name__}")
    if _COMMIT.match(revision):
        return
    parts = revision.split("/")
    problem = (
        "it is empty" if not revision else
        "it is longer than 255 characters" if len(revision) > 255 else
        "it contains '..'" if ".." in revision else
        "it contains a control character, space, backslash or one of ~^:?*["
        if _BAD_REF_CHARS.search(revision) else
        "it starts with '/' or '-'" if revision.startswith(("/", "-")) else
        "it has an empty component or one starting with '.'"
        if any(not p or p.startswith(".") for p in parts) else
        "it ends with '.' or '.lock'" if revision.endswith((".", ".lock")) else
        "it contains '@{'" if "@{" in revision or revision == "@" else None)
    if problem is not None:
        raise ValueError(f"revision={revision!r} is not a branch, tag or commit name: {problem}")


class _QuietRetries(logging.Filter):
    """Drops huggingface_hub's per-attempt retry warnings: the caller gets one error line."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("thrown while requesting" in msg
                    or msg.startswith(("Retrying in", "Rate limited")))


@contextmanager
def _quiet_retries():
    logger = logging.getLogger("huggingface_hub.utils._http")
    quiet = _QuietRetries()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _root_cause(e: BaseException) -> str:
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(e).split(" For more information check:")[0]  # httpx's pointer to MDN
    return " ".join(f"{type(e).__name__}: {text}".split())  # one line


def offline(local_files_only: bool = False) -> bool:
    """True when the caller or the environment (``HF_HUB_OFFLINE``) asks for the cache only."""
    if local_files_only:
        return True
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


class Repo:
    """A Hub model repository pinned to one commit, files fetched on demand.

    Example:
        >>> repo = Repo("deepseek-ai/DeepSeek-V4-Flash")               # doctest: +SKIP
        >>> repo.fetch("config.json")                                   # doctest: +SKIP
        '~/.cache/huggingface/hub/models--deepseek-ai--.../snapshots/<commit>/config.json'
    """

    def __init__(self, repo_id: str, *, revision: str | None = None, cache_dir=None,
                 token=None, local_files_only: bool = False, endpoint: str | None = None,
                 tqdm_class=None):
        check_revision(revision)
        self.repo_id = repo_id
        self.revision = revision
        self.cache_dir = cache_dir
        self.token = token
        self.local_files_only = offline(local_files_only)
        self.endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
        self.tqdm_class = tqdm_class
        self.folder: str | None = None

    def fetch(self, filename: str) -> str:
        """Local path of ``filename`` (downloaded unless cached). Raises FileNotFoundError
        naming the file, repo and revision when it is absent (or absent from the cache when
        offline)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{self.repo_id}@{self.revision or 'main'}"
        try:
            with _quiet_retries():
                path = hf_hub_download(self.repo_id, filename, revision=self.revision,
                                       cache_dir=self.cache_dir, token=self.token,
                                       local_files_only=self.local_files_only,
                                       endpoint=self.endpoint, tqdm_class=self.tqdm_class)
        except LocalEntryNotFoundError as e:
            if self.local_files_only:
                raise MissingFile(
                    f"{filename} of {where} is not in the Hugging Face cache and offline mode is "
                    f"on (local_files_only / HF_HUB_OFFLINE); run `mtp download {self.repo_id}` "
                    f"online first") from e
            from huggingface_hub import constants

            endpoint = self.endpoint or constants.ENDPOINT
            raise FileNotFoundError(
                f"could not fetch {filename} of {where} from {endpoint} ({_root_cause(e)}); "
                f"check the network or HF_ENDPOINT, or use the cache only with "
                f"local_files_only=True / HF_HUB_OFFLINE=1") from e
        except EntryNotFoundError as e:
            raise MissingFile(f"{where} has no file {filename}") from e
        except RevisionNotFoundError as e:
            raise FileNotFoundError(f"{self.repo_id} has no revision {self.revision!r}") from e
        except RepositoryNotFoundError as e:
            raise FileNotFoundError(f"no Hub repo {self.repo_id!r} (or it is private/gated and "
                                    f"needs token=...), and no local folder of that name") from e
        folder = os.path.dirname(path)
        commit = os.path.basename(folder)
        if self.folder is None:
            self.folder = folder
            if _COMMIT.match(commit):  # pin: later files come from the same commit
                self.revision = commit
        return path

    def exists(self, filename: str) -> bool:
        """Fetch ``filename`` if the repo has it (offline: if the cache has it)."""
        try:
            self.fetch(filename)
        except MissingFile:
            return False
        return True


__all__ = ["Repo", "MissingFile", "looks_like_repo_id", "local_path_problem", "check_revision",
           "offline", "INDEX", "SINGLE"]
