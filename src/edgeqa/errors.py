"""Errors a user acts on. Each message names the file, key or row, and says what is allowed."""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage refused its input. The message names the file, key or row and what is allowed."""
