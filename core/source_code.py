"""Which code a run was made by: the git commit of the TeachCache checkout and whether its tree was dirty.

Recorded by every student run beside its key (never in it: ``make cv`` resumes finished runs across commits), so
the cross-validation report can say when the runs it pools were made by different code.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["code_version"]

_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``{"commit": <sha1 hex>, "dirty": <tracked files changed since it, or new .py files>}`` of the checkout this code runs from;
    both ``None`` when it is not a git checkout (an installed package) or git is not at hand. Read once per
    process: the code a process runs is the code it imported."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain")
    if status is None:
        return {"commit": commit, "dirty": None}
    # a tracked file changed, or a new source file (imported, perhaps) not yet committed
    dirty = any(not line.startswith("??") or line.rstrip().endswith(".py") for line in status.splitlines())
    return {"commit": commit, "dirty": dirty}
