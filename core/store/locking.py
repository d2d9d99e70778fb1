"""The store's write lock: one writer at a time, refused at once with who holds it, released when its process
dies."""

from __future__ import annotations

import errno
import getpass
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from core.errors import StoreError
from core.user_cache import default_hash_cache

__all__ = ["inside_store", "read_only_store", "store_write_lock"]


def _is_remote(location: str) -> bool:
    """True for an fsspec URL other than ``file://``: no lock file can sit beside it."""
    return "://" in location and not location.startswith("file://")


def _lock_path(location: str) -> Path:
    """The write lock file of a store.

    ``<store>.lock`` beside a local store (never inside the Zarr group). A remote URL (``s3://…``) has no place
    for a lock file that every machine would see, so its lock is a file in the TeachCache cache folder named after
    the URL: it keeps two writers on this machine apart, not writers on two machines.
    """
    if not _is_remote(location):
        path = Path(location.removeprefix("file://")).resolve()
        return path.with_name(f"{path.name}.lock")
    digest = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]  # one lock for `url` and `url/`
    return default_hash_cache().parent / "locks" / f"{digest}.lock"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "?"


def _holder(info: Path) -> str:
    """Who holds the lock, as its description beside it (``<lock>.json``) says, for the refusal message."""
    try:
        holder = json.loads(info.read_text())
        return (
            f"`teachcache {holder['command']}`, pid {holder['pid']} on {holder['host']} (user {holder['user']}), "
            f"since {holder['since']}"
        )
    except (OSError, ValueError, KeyError):
        return "another process"


def _acquire(path: Path, location: str | Path) -> FileLock:
    """The lock file at ``path``, taken without waiting.

    Returns:
        the held lock.

    Raises:
        StoreError: another process holds it, or it cannot be created or locked.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=0)
        lock.acquire()
    except Timeout:
        who = _holder(path.with_name(f"{path.name}.json"))
        raise StoreError(
            f"{location} is being written by {who}; wait for it to finish, or stop it (a stopped run resumes where "
            f"it was). Two writers on one store are refused: lock {path}"
        ) from None
    # NotImplementedError: what filelock < 4 raises on a file system without flock
    except (OSError, NotImplementedError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        fix = (
            "set TEACHCACHE_CACHE_DIR to a writable local folder"
            if _is_remote(str(location))
            else f"the folder {path.parent} must be writable, on a file system with file locks"
        )
        raise StoreError(f"cannot take the write lock {path} for {location}: {reason}; {fix}") from None
    return lock


@contextmanager
def store_write_lock(location: str | Path, command: str) -> Iterator[None]:
    """Hold the store's exclusive write lock for the block, or refuse at once if another process holds it.

    ``teachcache preprocess`` and ``teachcache cache`` each hold it for their whole run (their dask workers write
    under the driver's lock). It is an OS-level lock (``filelock``, ``fcntl`` on Unix): the kernel releases it when
    its process dies, even by SIGKILL, so a killed run never blocks the next one. Who holds it (command, pid, host,
    user, since) is written beside it (``<lock>.json``), for the message the second process prints.

    Args:
        location: the store's path or fsspec URL (the store need not exist yet).
        command: the teachcache command taking the lock (``"preprocess"``, ``"cache"``), named to a second writer.

    Raises:
        StoreError: another process is writing the store, the lock file cannot be created or locked, or the block
            was refused writing inside the store (a read-only store: one message, not an ``OSError`` traceback).
    """
    path = _lock_path(str(location))
    info = path.with_name(f"{path.name}.json")
    lock = _acquire(path, location)
    try:
        with suppress(OSError):  # the lock holds without its description
            info.write_text(
                json.dumps(
                    {
                        "command": command,
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "user": _user(),
                        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    }
                )
            )
        try:
            yield
        except OSError as exc:
            refused = read_only_store(exc, location, command)
            if refused:
                raise refused from None
            raise
    finally:
        info.unlink(missing_ok=True)
        lock.release()


def read_only_store(exc: OSError, location: str | Path, command: str) -> StoreError | None:
    """The one message for a write the store refused — a read-only folder or file system (``EACCES``, ``EPERM``,
    ``EROFS`` on a file inside it) or a bucket these credentials may read but not write (s3fs turns S3's
    ``AccessDenied`` into a ``PermissionError``) — or ``None`` when ``exc`` is something else."""
    # s3fs names no file; a local PermissionError (the splits file, a raw image, the lock folder) is not the bucket's
    if (
        _is_remote(str(location))
        and isinstance(exc, PermissionError)
        and (exc.filename is None or inside_store(exc.filename, location))
    ):
        return StoreError(
            f"{location} cannot be written with these credentials ({exc}); `teachcache {command}` writes into the "
            "store. Use credentials allowed to write the bucket (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            " or your provider's equivalent), or point store.path at a bucket you may write"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and inside_store(exc.filename, location):
        return StoreError(
            f"{location} is read-only ({exc.strerror}: {exc.filename}); `teachcache {command}` writes into "
            "the store. Make it writable, or copy it to a writable place and point store.path there"
        )
    return None


def inside_store(filename: str | bytes | None, location: str | Path) -> bool:
    """True when a file named by an ``OSError`` lies inside the store at ``location``: under its folder for a local
    path or ``file://`` URL, or naming its bucket path for a remote URL (``s3://bucket/store.zarr``)."""
    if not filename:
        return False
    name = os.fsdecode(filename)
    if _is_remote(str(location)):
        return str(location).split("://", 1)[1].rstrip("/") in name
    store = Path(str(location).removeprefix("file://")).resolve()
    try:
        return Path(name).resolve().is_relative_to(store)
    except (OSError, ValueError):
        return False
