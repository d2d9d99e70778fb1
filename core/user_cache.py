"""TeachCache's per-user cache folder and what it remembers: file hashes (and, beside them, the store locks).

The folder is ``$TEACHCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/teachcache``, else ``~/.cache/teachcache``. Each
raw file's SHA-256 is computed once and remembered in ``file_sha256.json`` there, keyed by its absolute path, size
and modification time (ns). A file rewritten in place with its size and modification time restored is not
re-hashed; delete the cache file to force it. The bottom layer: it imports nothing of TeachCache's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["CACHE_DIR_ENV", "FileHashCache", "default_hash_cache"]

CACHE_DIR_ENV = "TEACHCACHE_CACHE_DIR"


def default_hash_cache() -> Path:
    """Where file hashes are remembered: ``file_sha256.json`` in the TeachCache cache folder (module docstring)."""
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "teachcache")
    return Path(root) / "file_sha256.json"


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class FileHashCache:
    """File content hashes remembered by (absolute path, size, mtime_ns) in a small JSON file.

    An unreadable or corrupt cache file counts as empty, and one that cannot be written is skipped: the cache only
    saves time, never changes a hash.

    Args:
        path: the JSON file (created on :meth:`save`).
    """

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict[str, int | str]] = self._read()
        self._dirty = False

    def _read(self) -> dict[str, dict[str, int | str]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def sha256(self, path: Path) -> str:
        """The SHA-256 of ``path``'s bytes, from the cache when its size and mtime are unchanged."""
        key = str(path.resolve())
        st = path.stat()
        known = self._entries.get(key)
        if (
            isinstance(known, dict)
            and known.get("size") == st.st_size
            and known.get("mtime_ns") == st.st_mtime_ns
        ):
            return str(known["sha256"])
        digest = _file_sha256(path)
        self._entries[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write new hashes, merged with what other processes saved meanwhile (atomic replace)."""
        if not self._dirty:
            return
        # files that are gone (deleted datasets, temporary folders) are forgotten
        merged = {k: v for k, v in {**self._read(), **self._entries}.items() if os.path.exists(k)}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(merged, indent=0, sort_keys=True) + "\n")
            tmp.replace(self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return
        self._dirty = False
