"""Error types shared by every layer.

A `UserError` is a mistake the user can fix (bad option, missing file, unreadable image): the CLI prints its
message on one line and exits 2, the server answers 4xx. Anything else is an internal fault (exit 1 / 500).
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message is shown as is, on one line."""

    #: HTTP status the server answers with.
    status: int = 400
    #: OpenAI error `param` (which request field was wrong), when known.
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param
        if status is not None:
            self.status = status


class ConfigError(UserError):
    """config.toml or a model's config.json is invalid (names the file and the key)."""


class ModelFilesError(UserError):
    """Model files are missing, unreachable or corrupt."""

    status = 503


class ImageError(UserError):
    """An image is missing, unreadable, too large or refused."""


class UnknownModelError(UserError):
    """A model id that the registry does not know."""

    status = 404
    param = "model"


class CheckpointError(Exception):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped tensors (internal or corrupt file)."""
