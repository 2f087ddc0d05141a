"""Fetching a checkpoint's files from the Hugging Face Hub, only the ones the drafter needs.

Everything goes through ``huggingface_hub.hf_hub_download`` into its usual cache, so revision,
cache_dir, token, offline mode and the cache behave as everywhere else. ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` are read when a call is made (``huggingface_hub`` reads them once, at import).
After the first file the revision is pinned to the commit it resolved to, so all files come
from one commit and cached files are served without a request.
"""

from __future__ import annotations

import os
import re

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class MissingFile(FileNotFoundError):
    """The repo (or, offline, the cache) has no such file; other failures raise otherwise."""


def looks_like_repo_id(s: str) -> bool:
    """``owner/name`` with the Hub's characters (a local folder is checked first)."""
    return bool(_REPO_ID.match(s)) and ".." not in s


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
            raise FileNotFoundError(f"could not fetch {filename} of {where}: {e}") from e
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


__all__ = ["Repo", "MissingFile", "looks_like_repo_id", "offline", "INDEX", "SINGLE"]
