"""The exception a refused checkpoint raises."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint the loader refuses; ``problems`` lists each reason (also in the message)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


__all__ = ["CheckpointError"]
