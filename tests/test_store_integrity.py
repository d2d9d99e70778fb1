"""`verify` finds what zarr would silently read as fill values or fail to decode, and re-running repairs it."""

from __future__ import annotations

from pathlib import Path

import zarr
from typer.testing import CliRunner

from cache_teachers import cache_teachers, preprocess_dataset
from core.store.locking import store_write_lock
from core.store.teacher_store import TeacherStore
from teachcache.cli import app
from tests.conftest import derived_config

runner = CliRunner()


def _cached(trained, name: str):
    root, data = trained
    cfg, path = derived_config(root, data, name)
    preprocess_dataset(cfg, progress=False)
    cache_teachers(cfg, names=["dynunet"], progress=False)
    assert runner.invoke(app, ["verify", cfg.store.path]).exit_code == 0
    return cfg, path


def _chunk(store: str, array: str) -> Path:
    files = sorted(p for p in (Path(store) / array / "c").rglob("*") if p.is_file())
    assert files, f"no chunk files under {array}"
    return files[0]


def _verify(store: str, *extra: str) -> tuple[int, str]:
    result = runner.invoke(app, ["verify", store, *extra])
    assert "Traceback" not in result.output
    return result.exit_code, " ".join(result.output.split())


def test_a_deleted_chunk_is_found_and_recomputed(trained):
    cfg, _ = _cached(trained, "lost_chunk")
    case = TeacherStore.open(cfg.store.path).case_ids()[0]
    _chunk(cfg.store.path, f"teachers/dynunet/all_folds/{case}/softmax").unlink()
    code, out = _verify(cfg.store.path)
    assert code == 1, out
    assert f"teacher dynunet/all_folds, case {case}: array 'softmax' has lost 1 chunk file(s)" in out
    summary = cache_teachers(cfg, names=["dynunet"], progress=False)
    assert summary.written["dynunet/all_folds"] == 1, "make cache recomputes exactly the damaged entry"
    assert _verify(cfg.store.path)[0] == 0


def test_a_deleted_case_chunk_is_found_and_rewritten(trained):
    cfg, _ = _cached(trained, "lost_case_chunk")
    case = TeacherStore.open(cfg.store.path).case_ids()[1]
    _chunk(
        cfg.store.path, f"cases/{case}/label"
    ).unlink()  # mostly background: zarr would have skipped it once
    code, out = _verify(cfg.store.path)
    assert code == 1 and f"case {case}: array 'label' has lost 1 chunk file(s)" in out, out
    assert preprocess_dataset(cfg, progress=False).written == 1
    assert _verify(cfg.store.path)[0] == 0


def test_a_truncated_chunk_is_named_and_its_fix_works(trained):
    cfg, _ = _cached(trained, "truncated_chunk")
    case = TeacherStore.open(cfg.store.path).case_ids()[2]
    damaged = [
        _chunk(cfg.store.path, f"teachers/dynunet/all_folds/{case}/fine"),
        _chunk(cfg.store.path, f"cases/{case}/image"),
    ]
    for chunk in damaged:
        chunk.write_bytes(chunk.read_bytes()[:20])
    code, out = _verify(cfg.store.path)
    assert code == 1, out
    assert (
        f"teacher dynunet/all_folds, case {case}: array 'fine' has 1 corrupt or truncated chunk file(s) ({damaged[0]}); "
        "delete them and run `make cache`"
    ) in out
    assert f"case {case}: array 'image' has 1 corrupt or truncated chunk file(s) ({damaged[1]})" in out
    for chunk in damaged:  # what the message says to do
        chunk.unlink()
    assert preprocess_dataset(cfg, progress=False).written == 1
    assert cache_teachers(cfg, names=["dynunet"], progress=False).written["dynunet/all_folds"] == 1
    assert _verify(cfg.store.path)[0] == 0


def test_every_problem_is_printed_beside_the_notes(trained):
    cfg, _ = _cached(trained, "problems_and_notes")
    first, second = TeacherStore.open(cfg.store.path).case_ids()[:2]
    root = zarr.open_group(cfg.store.path, mode="a")
    for key in (
        "all_chunks",
        "chunk_digests",
        "attrs_digest",
    ):  # as a TeachCache older than format 1.3 wrote it
        del root[f"teachers/dynunet/all_folds/{first}"].attrs[key]
    _chunk(cfg.store.path, f"teachers/dynunet/all_folds/{second}/coarse").unlink()
    root.require_group(
        "teachers/ghost/fold_1"
    )  # a run stopped between making the group and writing its provenance
    code, out = _verify(cfg.store.path)
    assert code == 1, out
    assert f"teacher dynunet/all_folds, case {second}: array 'coarse' has lost 1 chunk file(s)" in out
    assert "teacher ghost/fold_1: records no provenance" in out and "3 problem(s)" in out
    assert f"teacher dynunet/all_folds, case {first}: records no chunk digests" in out
    assert "note: 1 case(s)/entries were written before every chunk was stored" in out


def test_verify_with_the_config_checks_every_configured_teacher(trained):
    cfg, path = _cached(trained, "configured_teachers")
    code, out = _verify(cfg.store.path, "--config", str(path))
    assert code == 1, out
    assert "teacher unetr: configured but not cached at all" in out and "teacher swin:" in out


def test_a_store_being_rebuilt_refuses_cache_naming_the_writer(trained):
    root, data = trained
    cfg, path = derived_config(root, data, "being_rebuilt")
    with store_write_lock(cfg.store.path, "preprocess"):  # a first preprocess, before its first case
        result = runner.invoke(app, ["cache", "-c", str(path), "-t", "dynunet", "-q"])
    assert result.exit_code == 2 and "is being written by `teachcache preprocess`, pid" in result.output, (
        result.output
    )
    preprocess_dataset(cfg, progress=False)
    code, out = _verify(cfg.store.path)
    assert code == 0 and "note: no teacher is cached yet; pass -c CONFIG" in out, out
