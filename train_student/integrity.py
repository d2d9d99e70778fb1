"""Before a student trains: every chunk it will read is present and is the one written at its place.

Checks the chunk digests (:mod:`core.store.integrity`) of the fold's cases and of the entries of every teacher the
recipe reads, once, before the first step: a lost chunk would otherwise be read as fill values, a chunk moved from
another case would train the student on another case's targets, and a damaged one would stop training midway with
a codec's traceback. Only the stored bytes are read and hashed, nothing is decoded.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

from core.errors import StoreError
from core.store.integrity import GROUP_ATTRIBUTES, GroupIntegrity
from core.store.teacher_store import TeacherStore

__all__ = ["IntegrityWarning", "StoreCheck", "check_chunks"]

_SHOWN = 5  # problems named in the message; the rest counted


class IntegrityWarning(UserWarning):
    """The store's chunks were not checked before training (``--skip-integrity-check``)."""


@dataclass(frozen=True)
class StoreCheck:
    """What the check read: groups, chunks, stored bytes, and the seconds it took."""

    groups: int
    chunks: int
    nbytes: int
    seconds: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "groups": self.groups,
            "chunks": self.chunks,
            "bytes": self.nbytes,
            "seconds": round(self.seconds, 3),
        }


def _fix(path: str) -> str:
    return (
        "re-run `make cache` (its `teachcache preprocess` rewrites the case)"
        if path.startswith("cases/")
        else "re-run `make cache`, which recomputes the entry"
    )


def _describe(store: TeacherStore, found: GroupIntegrity) -> list[str]:
    where = _name(found.path)
    if found.unrecorded:
        return [
            f"{where} records no chunk digests (written before store format 2.2); record them with "
            f"`teachcache verify {store.location} --rehash`"
        ]
    lines = [
        f"{where}: array '{array}' has lost chunk(s) {', '.join(keys[:3])}"
        f"{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}; {_fix(found.path)}"
        for array, keys in found.missing.items()
    ]
    for array, keys in found.mismatched.items():
        if array == GROUP_ATTRIBUTES:
            lines.append(
                f"{where}: its attributes are not the ones written with it (edited since: "
                f"{store.location}/{found.path}/zarr.json); {_fix(found.path)}"
            )
            continue
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        lines.append(
            f"{where}: array '{array}' chunk(s) {shown} are not the ones written there (moved from another case or "
            f"teacher, or damaged: {store.location}/{found.path}/{array}/{keys[0]}); delete them and "
            f"{_fix(found.path)}"
        )
    return lines


def _name(path: str) -> str:
    """``cases/<case>`` → ``case <case>``; ``teachers/<name>/<slot>/<case>`` → ``teacher <name>/<slot>, case <case>``."""
    parts = path.split("/")
    if parts[0] == "cases":
        return f"case {parts[1]}"
    return f"teacher {'/'.join(parts[1:-1])}, case {parts[-1]}"


def check_chunks(
    store: TeacherStore, cases: list[str], entry_cases: list[str], teachers: list[str], skip: bool = False
) -> StoreCheck | None:
    """Check the digests of ``cases`` and of each teacher's entries for ``entry_cases`` before training.

    Args:
        store: the store the student reads.
        cases: every case the run reads (training, held-out and validation).
        entry_cases: the cases whose teacher entries the run reads (its training patches' cases).
        teachers: teacher keys whose entries the run reads (none for no-KD and online runs).
        skip: do not check; warn that the run trusts the store unchecked.

    Returns:
        What was read (``None`` when skipped).

    Raises:
        StoreError: a chunk lost, moved, altered or damaged, or a group recorded without digests — naming case or
            entry, array and chunk, and how to repair it.
    """
    if skip:
        warnings.warn(
            IntegrityWarning(
                f"{store.location}: chunks not checked before training (--skip-integrity-check): a lost, moved or "
                "damaged chunk would be read as it is; `teachcache verify` checks them"
            ),
            stacklevel=2,
        )
        return None
    start = time.perf_counter()
    groups = [f"cases/{c}" for c in cases] + [f"teachers/{t}/{c}" for t in teachers for c in entry_cases]
    found = store.check_groups(groups)
    problems = [line for f in found if not f.ok for line in _describe(store, f)]
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise StoreError(
            f"{store.location}: {len(problems)} problem(s) in what this run would read, found before training"
            f"{more}: " + "; ".join(problems[:_SHOWN])
        )
    return StoreCheck(
        len(groups), sum(f.chunks for f in found), sum(f.nbytes for f in found), time.perf_counter() - start
    )
