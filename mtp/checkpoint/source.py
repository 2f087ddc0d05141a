"""Step 1 of a load: find a checkpoint's files, in a local folder or a Hub repo.

:func:`find` reads ``config.json`` and the tensor names (the index, or the headers of a single
file or of the reference converter's per-rank files) and returns a :class:`Source`; nothing else
is read. :meth:`Source.fetch` makes the shards a plan needs present (downloads them from the
Hub, or checks a folder has them) and :meth:`Source.headers` reads their headers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..hub import INDEX, SINGLE, Repo, check_revision, local_path_problem
from .errors import CheckpointError
from .files import MAX_CONFIG, MAX_INDEX, load_json
from .header import TensorInfo, read_header

MP_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")


@dataclass(frozen=True)
class Entry:
    """One tensor name and the file that holds it (per the index, or a header)."""

    name: str
    file: str
    rank: int | None = None  # per-rank files: this file's rank ...
    world: int | None = None  # ... and the number of ranks
    indexed: bool = True  # listed by the index (False: found only in a shard's header)


@dataclass(frozen=True)
class Source:
    """Where a checkpoint is and what it names. ``layout``: "index", "single" or "mp";
    ``known_headers``: the headers already read to list the tensors (single and per-rank
    files); ``problems``: what the index itself gets wrong (a tensor listed twice)."""

    where: str
    folder: str
    layout: str
    raw_config: dict
    entries: tuple[Entry, ...]
    repo: Repo | None = None
    known_headers: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def files(self) -> list[str]:
        return sorted({e.file for e in self.entries})

    def path(self, file: str) -> str:
        return os.path.join(self.folder, file)

    def fetch(self, files: list[str]) -> None:
        """Make ``files`` present: download them (Hub) or check they exist (folder)."""
        for file in files:
            if self.repo is not None:
                self.repo.fetch(file)
            elif not os.path.exists(self.path(file)):
                names = sorted(e.name for e in self.entries if e.file == file)
                raise CheckpointError(
                    f"{self.where}: shard {file} is missing; the index puts {len(names)} needed "
                    f"tensor(s) there (e.g. {names[0]}). Download it into {self.folder}")

    def headers(self, files: list[str]) -> tuple[dict[str, dict[str, TensorInfo]], list[str]]:
        """The headers of ``files`` that are present, and the problems met reading them (a
        missing or damaged shard)."""
        out, problems = {}, []
        for file in files:
            if file in self.known_headers:
                out[file] = self.known_headers[file]
            elif os.path.exists(self.path(file)):
                try:
                    out[file] = read_header(self.path(file))
                except CheckpointError as e:
                    problems.append(str(e))
            elif self.repo is None:
                problems.append(f"shard {file} is missing from {self.folder}")
        return out, problems


def _read_index(path: str) -> tuple[list[Entry], list[str]]:
    problems: list[str] = []

    def no_duplicates(pairs):
        out: dict = {}
        for k, v in pairs:
            if k in out and isinstance(v, str):
                problems.append(f"the index lists {k} twice, in {out[k]} and in {v}: the same "
                                f"tensor in two shards; fix the index")
            out[k] = v
        return out

    index = load_json(path, "the index", MAX_INDEX, object_pairs_hook=no_duplicates)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{path}: no weight_map of tensor name -> shard file")
    bad = sorted({v for v in wm.values() if "/" in v or "\\" in v or v.startswith(".")})
    if bad:
        raise CheckpointError(f"{path}: shard names must be plain file names, got {bad[:3]}")
    return [Entry(k, v) for k, v in wm.items()], problems


def _local_layout(where: str, folder: str) -> tuple[str, set[str]]:
    present = set(os.listdir(folder))
    if "config.json" not in present:
        raise CheckpointError(f"{where}: no config.json; copy the model's config.json there")
    layout = ("index" if INDEX in present else "single" if SINGLE in present
              else "mp" if any(MP_FILE.match(f) for f in present) else None)
    if layout is None:
        raise CheckpointError(f"{where}: no {INDEX}, {SINGLE} or per-rank files "
                              f"(model0-mp8.safetensors, ...): not a safetensors checkpoint "
                              f"folder")
    return layout, present


def _hub_layout(where: str, repo: Repo) -> str:
    repo.fetch("config.json")
    if repo.exists(INDEX):
        return "index"
    if repo.exists(SINGLE):
        return "single"
    cache = " in the cache (offline mode)" if repo.local_files_only else ""
    raise CheckpointError(f"{where}: neither {INDEX} nor {SINGLE} found{cache} (per-rank "
                          f"files such as model0-mp8.safetensors are read from local folders "
                          f"only)")


def _per_rank_entries(where: str, folder: str, present: set[str],
                      headers: dict[str, dict[str, TensorInfo]]) -> list[Entry]:
    ranks = {f: (int(m.group(1)), int(m.group(2))) for f in present
             if (m := MP_FILE.match(f)) is not None}
    worlds = {w for _, w in ranks.values()}
    if len(worlds) != 1:
        raise CheckpointError(f"{where}: per-rank files of several world sizes {worlds}; "
                              f"keep one set")
    world = worlds.pop()
    have = {r for r, _ in ranks.values()}
    lost = [f"model{r}-mp{world}.safetensors" for r in range(world) if r not in have]
    if lost:
        raise CheckpointError(f"{where}: per-rank file(s) {lost} are missing")
    entries = []
    for file in sorted(ranks, key=lambda f: ranks[f][0]):
        headers[file] = read_header(os.path.join(folder, file))
        entries += [Entry(k, file, ranks[file][0], world) for k in headers[file]]
    return entries


def find(where, *, revision: str | None = None, cache_dir=None, token=None,
         local_files_only: bool = False, tqdm_class=None) -> Source:
    """A checkpoint folder, or a Hub repo id (then ``config.json`` and the index or single
    file are fetched). A missing path is reported at once, never sent to the Hub.

    Example:
        >>> find("checkpoints/DeepSeek-V4-Flash").layout        # doctest: +SKIP
        'index'
    """
    where = os.fspath(where)
    check_revision(revision)
    repo, present = None, set()
    if os.path.isdir(os.path.expanduser(where)):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {where!r} is a local "
                             f"folder")
        folder = os.path.expanduser(where)
        layout, present = _local_layout(where, folder)
    elif (problem := local_path_problem(where)) is not None:
        raise FileNotFoundError(problem)
    else:
        repo = Repo(where, revision=revision, cache_dir=cache_dir, token=token,
                    local_files_only=local_files_only, tqdm_class=tqdm_class)
        layout = _hub_layout(where, repo)
        folder = repo.folder
    raw_config = load_json(os.path.join(folder, "config.json"), "config.json", MAX_CONFIG)
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{where}: config.json is not a JSON object")
    headers: dict[str, dict[str, TensorInfo]] = {}
    problems: list[str] = []
    if layout == "index":
        entries, problems = _read_index(os.path.join(folder, INDEX))
    elif layout == "single":
        headers[SINGLE] = read_header(os.path.join(folder, SINGLE))
        entries = [Entry(k, SINGLE) for k in headers[SINGLE]]
    else:
        entries = _per_rank_entries(where, folder, present, headers)
    return Source(where, folder, layout, raw_config, tuple(entries), repo, headers,
                  tuple(problems))


__all__ = ["Entry", "Source", "find", "MP_FILE"]
