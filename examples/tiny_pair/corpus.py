"""The training corpus: a Python standard library's own ``.py`` files, split by file.

Every 20th file (in sorted path order) is held out. The split is identified by the Python
version it came from and a SHA-256 over the sorted (path, file SHA-256) pairs, so two machines
agree on it exactly when they read the same files. A snapshot (``make_snapshot``) freezes the
files into one tar.gz, so the GPU machine (another Python) trains on this machine's split.

The stream a model sees: per file BOS, its UTF-8 bytes, EOS, files concatenated.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import sysconfig
import tarfile

import numpy as np

from mtp.demo.tokenizer import TOKENIZER

HOLD_OUT_EVERY = 20


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_files(root: str) -> list[str]:
    """Sorted relative paths of the ``.py`` files under root, site-packages excluded."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for f in filenames:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def split(files: list[str]) -> tuple[list[str], list[str]]:
    """(train, held out): every HOLD_OUT_EVERY-th file (index 0, 20, 40, ...) is held out."""
    held = files[::HOLD_OUT_EVERY]
    keep = set(held)
    return [f for f in files if f not in keep], held


class Corpus:
    """Files read from a folder or a snapshot: ``texts`` {relative path: bytes}."""

    def __init__(self, texts: dict[str, bytes], python: str):
        self.texts, self.python = texts, python
        self.files = sorted(texts)
        self.train, self.heldout = split(self.files)

    @classmethod
    def from_folder(cls, root: str | None = None) -> Corpus:
        root = root or stdlib_root()
        texts = {}
        for f in list_files(root):
            with open(os.path.join(root, f), "rb") as fh:
                texts[f] = fh.read()
        return cls(texts, platform.python_version())

    @classmethod
    def from_snapshot(cls, path: str) -> Corpus:
        texts, python = {}, "?"
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name == "MANIFEST.json":
                    python = json.loads(data)["python"]
                else:
                    texts[member.name] = data
        return cls(texts, python)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.encode() + b"\0" + hashlib.sha256(self.texts[f]).digest())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"python": self.python, "files": len(self.files), "train_files": len(self.train),
                "heldout_files": len(self.heldout), "sha256": self.fingerprint(),
                "train_bytes": sum(len(self.texts[f]) for f in self.train),
                "heldout_bytes": sum(len(self.texts[f]) for f in self.heldout)}

    def stream(self, which: str) -> np.ndarray:
        """int16 token stream of the "train" or "heldout" files: BOS bytes EOS per file."""
        parts = []
        for f in self.train if which == "train" else self.heldout:
            parts += [np.array([TOKENIZER.BOS], np.int16),
                      np.frombuffer(self.texts[f], np.uint8).astype(np.int16),
                      np.array([TOKENIZER.EOS], np.int16)]
        return np.concatenate(parts)

    def make_snapshot(self, path: str) -> None:
        with tarfile.open(path, "w:gz") as tar:
            for name, data in [("MANIFEST.json", json.dumps(self.describe()).encode())] + \
                    [(f, self.texts[f]) for f in self.files]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def load(snapshot: str | None) -> Corpus:
    return Corpus.from_snapshot(snapshot) if snapshot else Corpus.from_folder()
