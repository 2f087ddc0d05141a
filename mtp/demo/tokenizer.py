"""The byte tokenizer of the tiny trained pair: token = UTF-8 byte (0..255), plus 3 specials.

Bytes, not BPE: Python source is ASCII-heavy, a byte vocabulary needs no training data or
extra dependency, and every string round-trips exactly. A small BPE would shorten sequences
(about 3 bytes per token on code) but put a 32k-row table into an 8 MB model whose whole point
is the drafting loop; with bytes, drafts are short and easy to predict, which is what a
demonstration of acceptance needs. The specials mark file boundaries in training.
"""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; ``BOS`` = 256 (a file starts), ``EOS`` = 257 (a file
    ends), ``PAD`` = 258; ``vocab_size`` = 259.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("def f():")
        [100, 101, 102, 32, 102, 40, 41, 58]
        >>> tok.decode(tok.encode("héllo") + [tok.EOS])
        'héllo'
    """

    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; specials are dropped, invalid UTF-8 shows as U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


TOKENIZER = ByteTokenizer()

__all__ = ["ByteTokenizer", "TOKENIZER"]
