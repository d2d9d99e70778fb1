"""Folders TeachCache writes to, checked before the work that fills them starts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from core.errors import ConfigError

__all__ = ["require_writable"]


def require_writable(directory: Path, what: str, fix: str) -> None:
    """Refuse a folder that cannot be made or written, before the work whose results go there.

    A probe file is created in it and removed: permission bits alone do not say (root ignores them; a read-only
    file system or a path under a regular file refuses everyone).

    Args:
        directory: the folder (made, with its parents, when missing).
        what: what was to be written there, for the message ("the checkpoint of teacher 'unetr'").
        fix: how to choose another place ("point teachers[].checkpoint at a writable place").

    Raises:
        ConfigError: naming the folder, the reason, what could not be written and the fix.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".teachcache-write-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{directory} is not writable ({exc.strerror or exc}), so {what} could not be written; nothing was "
            f"done. Make it writable, or {fix}"
        ) from None
